"""The parts of a model the FX adapter quantizes, and every Conv/Linear accounted for.

A model FX traces as a whole is one unit. Otherwise its traceable submodules are units, found
recursively (the children of a ``ModuleList``/``ModuleDict`` too, though such containers are never
called themselves), and the rest stays FP32; the space says which parts and why.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from autoquant.errors import CalibrationDataError, first_line
from autoquant.space import OpInfo, UnsupportedOp

from .fx_graph import WEIGHTED

Example = tuple[tuple[Any, ...], dict[str, Any]]


class TraceError(Exception):
    """FX could not trace (or run the traced form of) a part of the model."""


@dataclass(frozen=True)
class FlowStep:
    node: str
    op: str | None  # the searched op at this node, if any
    inputs: tuple[str, ...]


@dataclass
class Unit:
    """A traceable part of the model, quantized on its own; ``path`` "" is the whole model."""

    path: str
    module: fx.GraphModule  # the part, traced with every conv/linear as a module (fx_graph.trace)
    example: Example
    recording: fx.GraphModule  # prepared with recording observers: the calibration pass runs it
    leaf: bool = False  # a lone Conv/Linear, wrapped so that it stays a module call
    nodes: dict[str, str] = field(default_factory=dict)  # op name -> FX node name
    node_ops: dict[str, str] = field(default_factory=dict)  # FX node name -> op name
    flow: list[FlowStep] = field(default_factory=list)  # every op node in graph order
    prepared: dict[tuple, fx.GraphModule] = field(default_factory=dict)  # per qconfig family
    numbers: frozenset[str] = frozenset()  # nodes whose value is a number (from shapes), never observed

    def fp32_nodes(self, fp32_ops: frozenset[str]) -> list[str]:
        """Nodes to leave FP32: the FP32 ops, and the ops that only follow them.

        An op that is not searched (ReLU, pooling, padding) runs INT8 when any op feeding it does
        and any op it feeds does; left INT8 between FP32 ops, it would sit in a quantize/dequantize
        island. One that no searched op feeds (a padding of the model's input) follows the ops it
        feeds.
        """
        int8: dict[str, bool | None] = {}  # None: not decided by what feeds it
        for step in self.flow:
            if step.op is not None:
                int8[step.node] = step.op not in fp32_ops
            else:
                fed = [int8[name] for name in step.inputs if int8.get(name) is not None]
                int8[step.node] = any(fed) if fed else None
        consumers: dict[str, list[str]] = {}
        for step in self.flow:
            for name in step.inputs:
                consumers.setdefault(name, []).append(step.node)
        for step in reversed(self.flow):
            users = consumers.get(step.node, [])
            if int8[step.node] is None:
                int8[step.node] = any(int8[user] for user in users)
            elif step.op is None and users and not any(int8[user] for user in users):
                # feeds FP32 ops only: INT8 here would quantize their input (a tensor with an outlier
                # channel that the fallback was meant to keep whole)
                int8[step.node] = False
        return [node for node, quantized in int8.items() if not quantized]

    def op_name(self, local: str) -> str:
        if self.leaf and local == "module":
            return self.path
        if self.leaf and local.startswith("module."):
            local = local[len("module."):]
        return f"{self.path}.{local}" if self.path else local


class Leaf(nn.Module):
    """Holds a leaf unit (a lone Linear): tracing a module traces through its forward, so the
    Linear itself would become a plain F.linear call instead of a module FX can swap."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: Any) -> Any:  # FX cannot trace *args; Linear and Conv take one input
        return self.module(x)


def split(model: nn.Module, examples: dict[str, Example],
          make_unit: Callable[[str, nn.Module, Example], Unit]) -> tuple[list[Unit], list[UnsupportedOp]]:
    """Traceable units, largest first; the parts FX could not trace and why."""
    try:
        return [make_unit("", model, examples[""])], []
    except TraceError as whole:
        reason = f"FX cannot trace it as a whole ({whole}); its submodules are searched instead"
    units: list[Unit] = []
    untraceable = [UnsupportedOp("(whole model)", type(model).__name__, reason)]

    def visit(path: str, module: nn.Module) -> None:
        for child_name, child in module.named_children():
            child_path = f"{path}.{child_name}" if path else child_name
            if isinstance(child, (nn.ModuleList, nn.ModuleDict)):
                visit(child_path, child)  # never called itself: its children are
                continue
            if child_path not in examples or not any(isinstance(m, WEIGHTED) for m in child.modules()):
                continue
            try:
                units.append(make_unit(child_path, child, examples[child_path]))
            except TraceError as exc:
                untraceable.append(UnsupportedOp(child_path, type(child).__name__,
                                                 f"FX cannot trace it ({exc}); its submodules are searched instead"))
                visit(child_path, child)

    visit("", model)
    return units, untraceable


def capture_inputs(model: nn.Module, example: Example) -> dict[str, Example]:
    """Each module's inputs on its first call ("" for the model), from one FP32 forward pass, and
    the model's output under "(output)".

    This pass also checks the input signature before any tracing, so a wrong batch format is
    reported as that, not as an FX traceback.
    """
    captured: dict[str, Example] = {}
    hooks = []
    for path, module in model.named_modules():
        def hook(_module, args, kwargs, path=path):
            captured.setdefault(path, (args, kwargs))
        hooks.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    args, kwargs = example
    try:
        with torch.inference_mode():
            captured["(output)"] = ((model(*args, **kwargs),), {})
    except Exception as exc:
        shapes = [tuple(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__ for a in args]
        raise CalibrationDataError(
            f"The FP32 model fails on the first calibration batch, before any quantization: "
            f"{first_line(exc, 300)}. It was called with {len(args)} positional input(s) {shapes}"
            f"{' and keywords ' + str(sorted(kwargs)) if kwargs else ''}. Each batch must be the model input, "
            "(input, label), or a dict of keyword inputs, shaped as the model expects."
        ) from exc
    finally:
        for handle in hooks:
            handle.remove()
    return captured


def unaccounted(model: nn.Module, ops: list[OpInfo], unsupported: list[UnsupportedOp],
                called: set[str]) -> list[UnsupportedOp]:
    """Every Conv/Linear that is neither an op of the space nor already reported, with its reason."""
    named = {op.name for op in ops} | {u.name for u in unsupported}
    untraced = [u.name for u in unsupported if u.reason.startswith("FX cannot trace")]
    missing = []
    for path, module in model.named_modules():
        if not isinstance(module, WEIGHTED) or path in named:
            continue
        if path not in called:
            parent = path.rpartition(".")[0]
            reason = (f"never called as a module: {type(model.get_submodule(parent)).__name__} uses its weight "
                      "in its own code (no INT8 kernel for that); runs FP32")
        elif any(path.startswith(f"{u}.") for u in untraced):
            reason = "inside a part FX cannot trace, and not traceable on its own; runs FP32"
        else:
            reason = "not reached as a module call in the traced graph; runs FP32"
        missing.append(UnsupportedOp(path, type(module).__name__, reason))
    return missing
