"""PyTorch FX graph-mode quantization on the x86 engine (oneDNN/FBGEMM INT8 kernels).

Calibrate once, build many: one pass over the calibration data with recording observers keyed by
the observed FX node's name (stable across fallback sets, unlike observer names) collects
statistics; each candidate is then ``prepare_fx`` with range observers filled from those
statistics, and ``convert_fx``: no data pass per candidate. Weight observers run inside convert,
so weight granularity needs no data either.

A model FX cannot trace as a whole is split: its traceable submodules are quantized (recursively)
and the rest stays FP32, and the space says which parts and why.
"""

from __future__ import annotations

import copy
import inspect
import logging
import operator
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import lru_cache, partial
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.ao.quantization import (
    MinMaxObserver,
    PerChannelMinMaxObserver,
    PlaceholderObserver,
    QConfig,
    QConfigMapping,
)
from torch.ao.quantization.backend_config.x86 import get_x86_backend_config
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

from autoquant.calibration import CalibrationMethod, TensorStats, compute_range, read_stats, write_stats
from autoquant.data import first_batch, iterate_batches, model_inputs
from autoquant.errors import BackendError, CalibrationDataError, first_line
from autoquant.space import OpInfo, QuantConfig, Space, UnsupportedOp

from .base import Adapter

log = logging.getLogger("autoquant")

ENGINE = "x86"
MODEL_FILE = "model.pt"
# Function ops with INT8 kernels in the x86 backend config, searched one by one.
QUANTIZABLE_FUNCTIONS = {
    operator.add: "add", torch.add: "add", operator.mul: "mul", torch.mul: "mul",
    torch.cat: "cat", torch.matmul: "matmul",
}
# Heavy function ops that run FP32 between dequantize/quantize: reported, not searched.
FP32_FUNCTIONS = {
    torch.bmm: "bmm", nn.functional.softmax: "softmax", nn.functional.gelu: "gelu", nn.functional.silu: "silu",
    nn.functional.layer_norm: "layer_norm", torch.matmul: "matmul",
}


class _RecordingObserver(MinMaxObserver):
    """Passes tensors through, feeding them to a TensorStats when one is attached."""

    stats: TensorStats | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            return x
        if self.stats is not None:
            self.stats.update(x.detach().float().cpu().numpy())
        return super().forward(x)


class _RangeObserver(MinMaxObserver):
    """A MinMaxObserver whose range is set from cached statistics instead of data."""

    def set_range(self, lo: float, hi: float) -> None:
        self.min_val = torch.tensor(lo)
        self.max_val = torch.tensor(hi)


@dataclass(frozen=True)
class _FlowStep:
    node: str
    op: str | None  # the searched op at this node, if any
    address: tuple | None  # None for call_method nodes, which QConfigMapping cannot address one by one
    inputs: list[str]


@dataclass
class _Unit:
    """A traceable part of the model, quantized on its own; ``path`` "" is the whole model."""

    path: str
    module: nn.Module
    example: tuple[tuple[Any, ...], dict[str, Any]]
    recording: torch.fx.GraphModule | None = None
    # op name -> how QConfigMapping addresses it: ("module", name) or ("function", path, target, index)
    addresses: dict[str, tuple] = field(default_factory=dict)
    # FX node name -> op name, to find the ops that read an observed tensor
    node_ops: dict[str, str] = field(default_factory=dict)
    # every op node in graph order, to decide where the ops between searched ops run
    flow: list[_FlowStep] = field(default_factory=list)

    def fp32_addresses(self, fp32_ops: frozenset[str]) -> list[tuple]:
        """QConfigMapping addresses to set to None: the FP32 ops, and the ops that only follow them.

        An op that is not searched (ReLU, pooling, flatten) runs INT8 when any op feeding it does;
        left to the global qconfig after an FP32 op, it would sit in a quantize/dequantize island.
        """
        int8: dict[str, bool] = {}
        addresses = []
        for step in self.flow:
            if step.op is not None:
                int8[step.node] = step.op not in fp32_ops
            else:
                fed = [int8[name] for name in step.inputs if name in int8]
                int8[step.node] = any(fed) or not fed
            if not int8[step.node] and step.address is not None:
                addresses.append(step.address)
        return addresses

    def op_name(self, local: str) -> str:
        if isinstance(self.module, _Leaf) and local == "module":
            return self.path
        return f"{self.path}.{local}" if self.path else local


class _Leaf(nn.Module):
    """Holds a leaf unit (a lone Linear): tracing a module traces through its forward, so the
    Linear itself would become a plain F.linear call instead of a module FX can swap."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: Any) -> Any:  # FX cannot trace *args; Linear and Conv take one input
        return self.module(x)


class FXAdapter(Adapter):
    """Quantizes an ``nn.Module`` with ``torch.ao.quantization.quantize_fx``."""

    name = "fx"

    @classmethod
    def accepts(cls, model: Any) -> bool:
        return isinstance(model, nn.Module)

    def __init__(self, model: nn.Module, calib_data: Iterable[Any]) -> None:
        if ENGINE not in torch.backends.quantized.supported_engines:
            raise BackendError(
                f"This PyTorch build has no '{ENGINE}' quantized engine "
                f"(supported: {torch.backends.quantized.supported_engines})."
            )
        torch.backends.quantized.engine = ENGINE
        self._model = model.eval()
        self._calib_data = calib_data
        self._example = model_inputs(first_batch(calib_data))
        self._stats: dict[str, TensorStats] | None = None
        self._units, untraceable = self._split(model)
        ops, unsupported = [], list(untraceable)
        for unit in self._units:
            unit_ops, unit_unsupported = self._discover(unit)
            ops += unit_ops
            unsupported += unit_unsupported
        if not ops:
            raise BackendError(
                "Nothing in this model can be quantized by the FX x86 backend "
                f"(no Conv/Linear/add/mul/cat/matmul with INT8 kernels was found). {_reasons(unsupported)}"
            )
        dynamic = any("dynamic" in op.approaches for op in ops)
        self.space = Space(ops=tuple(ops), approaches=("static", "dynamic") if dynamic else ("static",),
                           unsupported=tuple(unsupported))
        self._range = lru_cache(maxsize=None)(self._compute_range)

    @property
    def fp32_model(self) -> nn.Module:
        return self._model

    # --- tracing and discovery ------------------------------------------------------------------
    def _split(self, model: nn.Module) -> tuple[list[_Unit], list[UnsupportedOp]]:
        """Traceable units, largest first; the parts FX could not trace and why."""
        try:
            return [self._unit("", model, self._example)], []
        except _TraceError as whole:
            log.warning("FX cannot trace the whole model (%s); quantizing its traceable submodules.", whole)
        examples = _capture_inputs(model, self._example)
        units: list[_Unit] = []
        untraceable: list[UnsupportedOp] = []

        def visit(path: str, module: nn.Module) -> None:
            for child_name, child in module.named_children():
                child_path = f"{path}.{child_name}" if path else child_name
                if child_path not in examples or not _has_quantizable_leaf(child):
                    continue
                try:
                    units.append(self._unit(child_path, child, examples[child_path]))
                except _TraceError as exc:
                    reason = f"FX cannot trace it ({exc}); its submodules are searched instead"
                    untraceable.append(UnsupportedOp(child_path, type(child).__name__, reason))
                    visit(child_path, child)

        visit("", model)
        untraceable.insert(0, UnsupportedOp("(whole model)", type(model).__name__, "FX cannot trace it as a whole"))
        return units, untraceable

    def _unit(self, path: str, module: nn.Module, example: tuple[tuple, dict]) -> _Unit:
        unit = _Unit(path, module if list(module.children()) else _Leaf(module), example)
        try:
            unit.recording = self._prepare(unit, _recording_mapping())
            _run(unit.recording, example)
        except Exception as exc:  # FX raises many types (TraceError, TypeError, NotImplementedError, ...)
            raise _TraceError(first_line(exc, 300)) from exc
        return unit

    def _prepare(self, unit: _Unit, mapping: QConfigMapping) -> torch.fx.GraphModule:
        args, kwargs = unit.example
        positional = inspect.signature(unit.module.forward).bind(*args, **kwargs).args
        return prepare_fx(copy.deepcopy(unit.module), mapping, positional, backend_config=get_x86_backend_config())

    def _discover(self, unit: _Unit) -> tuple[list[OpInfo], list[UnsupportedOp]]:
        """Ops that really become INT8 in the converted graph (module types alone can mislead)."""
        prepared = unit.recording
        static = dict(convert_fx(copy.deepcopy(prepared)).named_modules(remove_duplicate=False))
        dynamic_prepared = self._prepare(unit, _dynamic_mapping(_weight_observer("per_channel"), ()))
        dynamic = dict(convert_fx(dynamic_prepared).named_modules(remove_duplicate=False))
        modules = dict(prepared.named_modules(remove_duplicate=False))
        scope = prepared.meta["_observed_graph_module_attrs"].node_name_to_scope
        counters: dict[str, dict[Any, int]] = defaultdict(lambda: defaultdict(int))
        observers = {n for n in prepared.graph.nodes if isinstance(_module_of(prepared, n), _RecordingObserver)}
        ops, unsupported = [], []
        for node in prepared.graph.nodes:
            address, op_name = None, None
            if node.op == "call_module" and not isinstance(modules[node.target], _RecordingObserver):
                address = ("module", node.target)
                if _is_quantized(static.get(node.target)):
                    approaches = ("static", "dynamic") if _is_quantized(dynamic.get(node.target)) else ("static",)
                    op_name = unit.op_name(node.target)
                    ops.append(OpInfo(op_name, type(static[node.target]).__name__, approaches))
                elif any(True for _ in modules[node.target].parameters(recurse=False)):
                    unsupported.append(UnsupportedOp(unit.op_name(node.target), type(modules[node.target]).__name__,
                                                     "no INT8 kernel in the x86 backend; runs FP32"))
            elif node.op == "call_function":
                module_path = scope[node.name][0]
                address = ("function", module_path, node.target, counters[module_path][node.target])
                counters[module_path][node.target] += 1
                if node.target in QUANTIZABLE_FUNCTIONS and _is_observed(node, modules):
                    op_name = unit.op_name(node.name)
                    ops.append(OpInfo(op_name, QUANTIZABLE_FUNCTIONS[node.target]))
                elif node.target in FP32_FUNCTIONS:
                    unsupported.append(UnsupportedOp(unit.op_name(node.name), FP32_FUNCTIONS[node.target],
                                                     "no INT8 kernel in the x86 backend; runs FP32 between "
                                                     "dequantize/quantize"))
            elif node.op != "call_method":
                continue
            if op_name is not None:
                unit.addresses[op_name] = address
                unit.node_ops[node.name] = op_name
            inputs = [a.args[0].name if a in observers else a.name for a in node.all_input_nodes]
            unit.flow.append(_FlowStep(node.name, op_name, address, inputs))
        return ops, unsupported

    # --- calibration ----------------------------------------------------------------------------
    def calibrate(self) -> None:
        if self._stats is not None:
            return
        start = time.perf_counter()
        stats: dict[str, TensorStats] = {}
        for unit in self._units:
            for node in unit.recording.graph.nodes:
                observer = _module_of(unit.recording, node)
                if isinstance(observer, _RecordingObserver):
                    key = _stats_key(unit, node.args[0].name)
                    if observer.stats is not None:
                        # Same-scale ops (max-pool, flatten) share their input's observer: same range.
                        stats.setdefault(key, observer.stats)
                    elif key in stats:
                        continue  # a tensor observed twice: record it once
                    else:
                        observer.stats = stats[key] = TensorStats()
        model = self._assemble(self._model, {u.path: u.recording for u in self._units}, copy_root=False)
        batches = 0
        with torch.inference_mode():
            for batch in iterate_batches(self._calib_data):
                args, kwargs = model_inputs(batch)
                try:
                    model(*args, **kwargs)
                except Exception as exc:
                    raise CalibrationDataError(
                        f"The model failed on calibration batch {batches}: {type(exc).__name__}: {exc}. "
                        "Each batch must be the model input, (input, label), or a dict of keyword inputs."
                    ) from exc
                batches += 1
        for unit in self._units:
            for node in unit.recording.graph.nodes:
                observer = _module_of(unit.recording, node)
                if isinstance(observer, _RecordingObserver):
                    observer.stats = None
        nonfinite = {k: s.nonfinite for k, s in stats.items() if s.nonfinite}
        if nonfinite:
            log.warning("Ignored non-finite activation values while calibrating: %s", nonfinite)
        self._stats = stats
        log.info("Calibrated %d tensors over %d batch(es) in %.1f s.", len(stats), batches, time.perf_counter() - start)

    def _compute_range(self, key: str, calibration: str, symmetric: bool) -> tuple[float, float]:
        if key not in self._stats:
            raise BackendError(f"No calibration statistics for tensor '{key}' (an autoquant bug: please report it).")
        return compute_range(self._stats[key], CalibrationMethod.parse(calibration), symmetric=symmetric)

    # --- calibration cache ----------------------------------------------------------------------
    def _stats_keys(self) -> set[str]:
        return {
            _stats_key(unit, node.args[0].name)
            for unit in self._units for node in unit.recording.graph.nodes
            if isinstance(_module_of(unit.recording, node), _RecordingObserver)
        }

    def save_stats(self, path: Path) -> bool:
        """JSON of ``TensorStats.to_dict`` per observed tensor, written atomically."""
        self.calibrate()
        write_stats(path, self._stats)
        return True

    def load_stats(self, path: Path) -> bool:
        self._stats = read_stats(path, self._stats_keys())
        self._range.cache_clear()
        return True

    # --- candidates -----------------------------------------------------------------------------
    def build(self, config: QuantConfig) -> nn.Module:
        self.calibrate()
        weight = _weight_observer(config.granularity)
        converted = {}
        for unit in self._units:
            if config.approach == "dynamic":
                fp32 = [unit.addresses[name] for name in config.fp32_ops if name in unit.addresses]
                prepared = self._prepare(unit, _dynamic_mapping(weight, fp32))
            else:
                symmetric = config.scheme == "symmetric"
                activation = _RangeObserver.with_args(
                    dtype=torch.quint8,
                    qscheme=torch.per_tensor_symmetric if symmetric else torch.per_tensor_affine,
                )
                fp32 = unit.fp32_addresses(config.fp32_ops)
                mapping = _with_fallback(QConfigMapping().set_global(QConfig(activation, weight)), fp32)
                prepared = self._prepare(unit, mapping)
                for node in prepared.graph.nodes:
                    observer = _module_of(prepared, node)
                    if isinstance(observer, _RangeObserver):
                        key = _stats_key(unit, node.args[0].name)
                        method = _calibration_for(node, unit, config)
                        observer.set_range(*self._range(key, method, symmetric))
            try:
                converted[unit.path] = convert_fx(prepared)
            except Exception as exc:
                raise BackendError(f"convert_fx failed for {config.describe()}: {first_line(exc, 300)}") from exc
        return self._assemble(self._model, converted, copy_root=True)

    @staticmethod
    def _assemble(model: nn.Module, parts: dict[str, nn.Module], *, copy_root: bool) -> nn.Module:
        """The model with each unit replaced by its prepared or converted form."""
        if "" in parts:
            return parts[""]
        root = copy.deepcopy(model) if copy_root else _shallow_tree_copy(model, parts)
        for path, module in parts.items():
            parent, _, child = path.rpartition(".")
            setattr(root.get_submodule(parent), child, module)
        return root

    def runner(self, model: nn.Module) -> Callable[[], object]:
        args, kwargs = self._example

        def run() -> object:
            with torch.inference_mode():
                return model(*args, **kwargs)

        return run

    def batch_runners(self, model: nn.Module, limit: int) -> list[Callable[[], object]]:
        batches = zip(range(limit), iterate_batches(self._calib_data), strict=False)
        return [partial(_run, model, model_inputs(batch)) for _, batch in batches]

    # --- files ----------------------------------------------------------------------------------
    def save_model(self, model: nn.Module, directory: Path) -> Path:
        """TorchScript, so that plain ``torch.jit.load`` runs it (quantized GraphModules do not pickle)."""
        path = Path(directory) / MODEL_FILE
        args, kwargs = self._example
        with torch.no_grad():
            scripted = torch.jit.trace(model, args or None, example_kwarg_inputs=kwargs or None)
        torch.jit.save(scripted, str(path))
        return path

    @classmethod
    def load_model(cls, path: Path) -> torch.jit.ScriptModule:
        torch.backends.quantized.engine = ENGINE
        return torch.jit.load(str(path))


class _TraceError(Exception):
    pass


def _recording_mapping() -> QConfigMapping:
    weight = _weight_observer("per_channel")
    return QConfigMapping().set_global(QConfig(_RecordingObserver.with_args(dtype=torch.quint8), weight))


def _dynamic_mapping(weight: Any, fp32: list[tuple]) -> QConfigMapping:
    activation = PlaceholderObserver.with_args(dtype=torch.quint8, quant_min=0, quant_max=255, is_dynamic=True)
    # Global: the backend only has dynamic kernels for Linear (and fused Linear+ReLU needs one qconfig).
    mapping = QConfigMapping().set_global(QConfig(activation, weight))
    return _with_fallback(mapping, fp32)


def _with_fallback(mapping: QConfigMapping, fp32: list[tuple]) -> QConfigMapping:
    for address in fp32:
        if address[0] == "module":
            mapping.set_module_name(address[1], None)
        else:
            _, module_path, target, index = address
            mapping.set_module_name_object_type_order(module_path, target, index, None)
    return mapping


def _calibration_for(observer: torch.fx.Node, unit: _Unit, config: QuantConfig) -> str:
    """An op's calibration override applies to the tensors it reads."""
    for user in observer.users:
        op = unit.node_ops.get(user.name)
        if op in config.op_calibration:
            return config.op_calibration[op]
    return config.calibration


def _weight_observer(granularity: str) -> Any:
    if granularity == "per_channel":
        return PerChannelMinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_channel_symmetric)
    return MinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric)


def _stats_key(unit: _Unit, node_name: str) -> str:
    return f"{unit.path}/{node_name}"


def _module_of(graph_module: torch.fx.GraphModule, node: torch.fx.Node) -> nn.Module | None:
    return graph_module.get_submodule(node.target) if node.op == "call_module" else None


def _is_quantized(module: nn.Module | None) -> bool:
    return module is not None and type(module).__module__.startswith(
        ("torch.ao.nn.quantized", "torch.ao.nn.intrinsic.quantized")
    )


def _is_observed(node: torch.fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether the prepared graph quantizes all tensor inputs of the op (its output may be observed
    after a fused ReLU, as in add+relu)."""
    inputs = node.all_input_nodes
    return bool(inputs) and all(
        n.op == "call_module" and isinstance(modules.get(n.target), _RecordingObserver) for n in inputs
    )


def _has_quantizable_leaf(module: nn.Module) -> bool:
    return any(isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) for m in module.modules())


def _capture_inputs(model: nn.Module, example: tuple[tuple, dict]) -> dict[str, tuple[tuple, dict]]:
    """Each submodule's inputs on its first call, from one FP32 forward pass."""
    captured: dict[str, tuple[tuple, dict]] = {}
    hooks = []
    for path, module in model.named_modules():
        if path:
            def hook(_module, args, kwargs, path=path):
                captured.setdefault(path, (args, kwargs))
            hooks.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        _run(model, example)
    finally:
        for handle in hooks:
            handle.remove()
    return captured


def _shallow_tree_copy(model: nn.Module, parts: dict[str, nn.Module]) -> nn.Module:
    """A copy of the module tree above the units that shares every parameter with ``model``."""
    root = copy.copy(model)
    root._modules = dict(model._modules)
    parents = {p.rpartition(".")[0] for p in parts}
    for parent in sorted({".".join(p.split(".")[:i]) for p in parents for i in range(1, len(p.split(".")) + 1)}):
        if not parent:
            continue
        holder, _, name = parent.rpartition(".")
        original = root.get_submodule(parent)
        clone = copy.copy(original)
        clone._modules = dict(original._modules)
        setattr(root.get_submodule(holder), name, clone)
    return root


def _run(model: nn.Module, example: tuple[tuple, dict]) -> Any:
    args, kwargs = example
    with torch.inference_mode():
        return model(*args, **kwargs)


def _reasons(unsupported: list[UnsupportedOp]) -> str:
    return "; ".join(f"{u.name} ({u.op_type}): {u.reason}" for u in unsupported[:10])
