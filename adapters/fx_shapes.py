"""Tracing a forward whose Python code computes with its input's shape, at the example's shapes.

Hugging Face's TF-style "same" padding does ``int(features.shape[-2])`` in ``forward``: FX cannot
trace that (a shape read returns a Proxy, and ``int`` of a Proxy raises), so such a model used to
split into one unit per conv, each conv quantized on its own with BatchNorm and ReLU6 in FP32
between them (MobileNetV2: INT8 1.2x slower than FP32). ``ShapeTracer`` carries every traced value
as a meta tensor (a shape without data: nothing is computed), so shape reads return numbers and the
code runs as it would on the example; the graph is then valid for inputs of the example's shapes.

Each traced graph checks its tensor inputs' shapes when it runs (``expect_shapes``): a batch of
another shape raises a clear error instead of computing a wrong padding. An axis is left free when a
trace with every input one larger along it gives the same graph (the batch axis, usually; the image
size of a network that only checks its channel count).
"""

from __future__ import annotations

import copy
import inspect
from typing import Any

import torch
from torch import fx, nn
from torch.fx.node import has_side_effect

from .fx_graph import Tracer, trace

Example = tuple[tuple[Any, ...], dict[str, Any]]
FREE_AXES = "autoquant_free_axes"  # graph meta: the input axes whose size the graph does not depend on


@fx.wrap
def expect_shapes(inputs: tuple, shapes: tuple, where: str) -> None:
    """Raise unless each input tensor has its traced shape (None: any size, shown as *)."""
    for tensor, shape in zip(inputs, shapes, strict=True):
        got = tuple(tensor.shape)
        if len(got) != len(shape) or any(want is not None and want != g for want, g in zip(shape, got, strict=True)):
            raise ValueError(
                f"{where} was traced for inputs of shape {_text(shapes)} (its forward computes with its input's "
                f"shape, e.g. TF-style padding), and got an input of shape {list(got)}. Calibrate with batches "
                "of the shapes you run the model on."
            )


has_side_effect(expect_shapes)  # a check with no output: kept by dead-code elimination


class ShapeTracer(Tracer):
    """Our tracer, with a meta tensor per traced value so that shape reads are numbers."""

    def __init__(self, inputs: dict[str, Any], recorded: dict[int, list] | None = None) -> None:
        super().__init__(recorded)
        self.inputs = inputs  # placeholder name -> meta tensor
        self.metas: dict[fx.Node, Any] = {}
        self._meta_parameters: dict[int, torch.Tensor] = {}
        self._meta_modules: dict[str, nn.Module] = {}

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return ShapeProxy(node, self)

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None,  # noqa: ANN001, ANN201
                     proxy_factory_fn=None):
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        try:
            self.metas[proxy.node] = self._evaluate(kind, target, args, kwargs)
        except Exception:  # an op without a meta kernel: its shape stays symbolic, as in a plain trace
            pass
        return proxy

    def _evaluate(self, kind: str, target: Any, args: tuple, kwargs: dict) -> Any:
        if kind == "placeholder":
            return self.inputs[target]
        if kind == "get_attr":
            return self._meta(_attribute(self.root, target))
        args, kwargs = fx.node.map_aggregate((args, kwargs), self._meta)
        if kind == "call_function":
            return target(*args, **kwargs)
        if kind == "call_method":
            return getattr(args[0], target)(*args[1:], **kwargs)
        if kind == "call_module":  # a leaf: its own forward, not the tracer's patched module call
            if target not in self._meta_modules:
                self._meta_modules[target] = copy.deepcopy(self.root.get_submodule(target)).to("meta")
            return self._meta_modules[target].forward(*args, **kwargs)
        raise KeyError(kind)

    def _meta(self, value: Any) -> Any:
        if isinstance(value, fx.Proxy):
            return self.metas[value.node]  # KeyError when unknown: the caller's value is unknown too
        if isinstance(value, torch.Tensor) and value.device.type != "meta":
            if id(value) not in self._meta_parameters:
                self._meta_parameters[id(value)] = value.to("meta")
            return self._meta_parameters[id(value)]
        return value


class ShapeProxy(fx.Proxy):
    """A Proxy whose shape is a number when its meta tensor is known."""

    def _tensor(self) -> torch.Tensor | None:
        value = self.tracer.metas.get(self.node)  # type: ignore[attr-defined]
        return value if isinstance(value, torch.Tensor) else None

    @property
    def shape(self) -> Any:
        meta = self._tensor()
        return meta.shape if meta is not None else self.tracer.create_proxy("call_function", getattr,
                                                                            (self, "shape"), {})

    @property
    def ndim(self) -> Any:
        meta = self._tensor()
        return meta.ndim if meta is not None else self.tracer.create_proxy("call_function", getattr,
                                                                           (self, "ndim"), {})

    def size(self, dim: int | None = None) -> Any:
        meta = self._tensor()
        if meta is None:
            return self.tracer.create_proxy("call_method", "size", (self,) if dim is None else (self, dim), {})
        return meta.shape if dim is None else meta.shape[dim]

    def dim(self) -> Any:
        meta = self._tensor()
        return meta.dim() if meta is not None else self.tracer.create_proxy("call_method", "dim", (self,), {})


def trace_at_shapes(module: nn.Module, example: Example, concrete_args: dict | None = None,
                    recorded: dict[int, list] | None = None, where: str = "this module") -> fx.GraphModule:
    """``module`` traced (``fx_graph.trace``) with shape reads answered from ``example``, and a
    check in front of the input sizes the graph depends on."""
    inputs = _placeholders(module, example, concrete_args)
    gm = trace(module, concrete_args, recorded, ShapeTracer(_metas(inputs), recorded))
    tensors = [(name, value) for name, value in inputs.items() if isinstance(value, torch.Tensor)]
    free = frozenset(axis for axis in range(max((t.dim() for _, t in tensors), default=0))
                     if _same_graph_when_grown(module, inputs, axis, concrete_args, recorded, gm.code))
    shapes = tuple(tuple(None if axis in free else n for axis, n in enumerate(value.shape)) for _, value in tensors)
    placeholders = {n.target: n for n in gm.graph.nodes if n.op == "placeholder"}
    with gm.graph.inserting_after(list(placeholders.values())[-1]):
        check = gm.graph.call_function(expect_shapes, (tuple(placeholders[name] for name, _ in tensors), shapes, where))
    check.meta["is_wrapped"] = True  # generated code wraps it, so that re-tracing (prepare_fx) records the call
    gm.recompile()
    gm.meta[FREE_AXES] = free
    return gm


def _same_graph_when_grown(module: nn.Module, inputs: dict[str, Any], axis: int, concrete_args: dict | None,
                           recorded: dict[int, list] | None, code: str) -> bool:
    """Whether a trace with every tensor input one larger along ``axis`` gives the same code."""
    grown = {k: v.new_empty(tuple(n + (i == axis) for i, n in enumerate(v.shape))) if isinstance(v, torch.Tensor)
             else v for k, v in _metas(inputs).items()}
    try:
        return trace(module, concrete_args, recorded, ShapeTracer(grown, recorded)).code == code
    except Exception:  # that size does not trace (a size check raised): keep the axis fixed
        return False


def _placeholders(module: nn.Module, example: Example, concrete_args: dict | None) -> dict[str, Any]:
    args, kwargs = example
    bound = inspect.signature(module.forward).bind(*args, **kwargs)
    return {k: v for k, v in bound.arguments.items() if k not in (concrete_args or {})}


def _metas(inputs: dict[str, Any]) -> dict[str, Any]:
    return {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def _attribute(root: nn.Module, target: str) -> Any:
    holder, _, name = target.rpartition(".")
    return getattr(root.get_submodule(holder), name)


def _text(shapes: tuple) -> str:
    return ", ".join("[" + ", ".join("*" if n is None else str(n) for n in shape) + "]" for shape in shapes)
