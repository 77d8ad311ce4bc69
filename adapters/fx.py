"""PyTorch FX graph-mode quantization on the x86 engine (oneDNN/FBGEMM INT8 kernels).

Calibrate once, build many: one pass over the calibration data with recording observers keyed by
the observed FX node's name (stable across fallback sets, unlike observer names) collects
statistics. Each unit is traced and prepared once per qconfig family (approach, scheme, weight
granularity); a candidate is a copy of that prepared graph that shares its tensors, with range
observers filled from the statistics and its FP32 nodes' qconfigs set to None, then ``convert_fx``:
no data pass, no re-trace, no re-prepare per candidate. Weight observers run inside convert, so
weight granularity needs no data either.

Every convolution and linear is a module of the traced graph however the model writes it
(``fx_graph``); a model FX cannot trace as a whole is split into traceable units (``fx_units``).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import logging
import operator
import pkgutil
import warnings
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn
from torch.ao.quantization import (
    MinMaxObserver,
    PerChannelMinMaxObserver,
    PlaceholderObserver,
    QConfig,
    QConfigMapping,
)
from torch.ao.quantization.backend_config import BackendConfig, BackendPatternConfig
from torch.ao.quantization.backend_config.x86 import get_x86_backend_config
from torch.ao.quantization.observer import ObserverBase
from torch.ao.quantization.qconfig_mapping import _FIXED_QPARAMS_OP_TO_OBSERVER
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

from autoquant.calibration import TensorStats
from autoquant.data import iterate_batches, model_inputs
from autoquant.errors import BackendError, first_line
from autoquant.smoothing import ALPHAS, smoothed_range
from autoquant.space import OpInfo, QuantConfig, Space, UnsupportedOp

from . import fx_graph, fx_shapes
from .base import Observation, TensorStatsAdapter, calibration_for
from .fx_bf16 import BF16Linear, faster, measure_bf16
from .fx_dynamic import full_range_is_exact, use_full_range
from .fx_lowering import PackedWeights, int8_padding, reusing_packed_weights
from .fx_padding import same_padded_depthwise
from .fx_rewrites import int8_friendly
from .fx_smoothing import Smoother, divide_inputs, smoothing_groups
from .fx_units import Example, FlowStep, Leaf, TraceError, Unit, capture_inputs, split, unaccounted

log = logging.getLogger("autoquant")

ENGINE = "x86"
MODEL_FILE = "model.pt"
OUTPUT_CLASS = "output_class"  # extra file of a saved model: the class of its dict output
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
# Modules that compute nothing at inference: never offered as ops.
NO_OPS = (nn.modules.dropout._DropoutNd, nn.Identity)
_PER_CHANNEL_WEIGHT = PerChannelMinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_channel_symmetric)


class _RecordingObserver(MinMaxObserver):
    """Passes tensors through, feeding them to a TensorStats when one is attached."""

    stats: TensorStats | None = None
    saw_non_tensor = False  # a number computed from shapes (``(d // heads) ** -0.5``): never quantized

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            self.saw_non_tensor = True
            return x
        if not x.is_floating_point():
            return x
        if self.stats is not None:
            self.stats.update(x.detach().float().cpu().numpy())
        return super().forward(x)


class _RangeObserver(MinMaxObserver):
    """A MinMaxObserver whose range is set from cached statistics instead of data."""

    def set_range(self, lo: float, hi: float) -> None:
        self.min_val = torch.tensor(lo)
        self.max_val = torch.tensor(hi)


class _WeightObserver:
    """Weight observers that remember each weight's range: every candidate converts the same
    (shared) weight tensors, and the per-channel min/max pass is a third of a convert."""

    def __init__(self, granularity: str) -> None:
        self.granularity = granularity
        # keyed by (data_ptr, version, shape); the tensor is kept so that its address cannot be reused
        self._ranges: dict[tuple[int, int, tuple[int, ...]], tuple[torch.Tensor, ...]] = {}

    def factory(self) -> Any:
        base = PerChannelMinMaxObserver if self.granularity == "per_channel" else MinMaxObserver
        qscheme = torch.per_channel_symmetric if self.granularity == "per_channel" else torch.per_tensor_symmetric
        ranges = self._ranges

        # A base chosen at run time, in a closure: deep copies of a prepared graph share ``ranges``.
        class Cached(base):  # type: ignore[valid-type,misc]
            min_val: torch.Tensor  # the base's buffers
            max_val: torch.Tensor

            def forward(self, w: torch.Tensor) -> torch.Tensor:
                version = 0 if w.is_inference() else w._version  # inference tensors have no counter
                key = (w.data_ptr(), version, tuple(w.shape))
                if key not in ranges or ranges[key][0] is not w:
                    super().forward(w)
                    ranges[key] = (w, self.min_val, self.max_val)
                _, self.min_val, self.max_val = ranges[key]
                return w

        Cached.__name__ = base.__name__
        return Cached.with_args(dtype=torch.qint8, qscheme=qscheme)


class FXAdapter(TensorStatsAdapter):
    """Quantizes an ``nn.Module`` with ``torch.ao.quantization.quantize_fx``."""

    name = "fx"
    batch_hint = "Each batch must be the model input, (input, label), or a dict of keyword inputs."

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
        super().__init__(calib_data)
        self._weights = {g: _WeightObserver(g) for g in ("per_channel", "per_tensor")}
        self._packed = PackedWeights()
        self._bf16_modules: dict[str, BF16Linear] = {}  # built once per op, shared by candidates
        examples = capture_inputs(model, self._example)
        # FX returns a dict subclass (a Hugging Face ModelOutput) as a plain dict: restored in build
        self._output_class = type(examples.pop("(output)")[0][0])
        # conv subclasses recorded as (pad, conv) calls on their input: traced as those, specialised
        self._recorded = {id(m): calls for path, m in model.named_modules()
                          if path in examples and (calls := fx_graph.record(m, examples[path])) is not None}
        self._units, untraceable = split(model, examples, self._unit)
        ops, unsupported = [], list(untraceable)
        for unit in self._units:
            unit_ops, unit_unsupported = self._discover(unit)
            ops += unit_ops
            unsupported += unit_unsupported
        unsupported += unaccounted(model, ops, unsupported, set(examples))
        if not ops:
            raise BackendError(
                "Nothing in this model can be quantized by the FX x86 backend "
                "(no Conv/Linear/add/mul/cat/matmul with INT8 kernels was found). "
                + "; ".join(f"{u.name} ({u.op_type}): {u.reason}" for u in unsupported[:10])
            )
        dynamic = any("dynamic" in op.approaches for op in ops)
        ops = self._with_bf16(ops, examples)
        # SmoothQuant (static): the Linears of each unit grouped by the tensor they read
        self._smooth_groups = {u.path: smoothing_groups(u.recording, lambda m: isinstance(m, _RecordingObserver))
                               for u in self._units}
        self._smoother = Smoother()
        alphas = ALPHAS if any(self._smooth_groups.values()) else (None,)
        self.space = Space(ops=tuple(ops), approaches=("static", "dynamic") if dynamic else ("static",),
                           smooth_alphas=alphas, unsupported=tuple(unsupported),
                           fallbacks=("fp32", "bf16") if any(op.bf16_ratio is not None for op in ops) else ("fp32",),
                           bf16_buildable=frozenset(self._bf16))

    @property
    def fp32_model(self) -> nn.Module:
        return self._model

    # --- tracing and discovery ------------------------------------------------------------------
    def _unit(self, path: str, module: nn.Module, example: tuple[tuple, dict]) -> Unit:
        leaf = not list(module.children())
        root = Leaf(module) if leaf else module
        try:
            traced = int8_friendly(same_padded_depthwise(self._trace(path, root, example), example))
            recording_qconfig = QConfig(_RecordingObserver.with_args(dtype=torch.quint8), _PER_CHANNEL_WEIGHT)
            recording = _prepare(traced, example, _static_mapping(recording_qconfig))
            self._run(recording, example)
            numbers = _numbers(recording)
            _drop_observers(recording, numbers)
        except Exception as exc:  # FX raises many types (TraceError, TypeError, NotImplementedError, ...)
            raise TraceError(first_line(exc, 300)) from exc
        return Unit(path, traced, example, recording, leaf=leaf, numbers=numbers)

    def _trace(self, path: str, root: nn.Module, example: tuple[tuple, dict]) -> fx.GraphModule:
        """The unit's graph; where the model's forward computes with its input's shape (FX cannot
        trace that), the graph at the example's shapes, if the sizes it depends on are the same in
        every calibration batch (otherwise the model is split into units as before)."""
        constants = _none_arguments(root, example)
        try:
            return fx_graph.trace(root, constants, self._recorded)
        except Exception as plain:
            if path:  # a part: the model's code around it may read its modules' float attributes
                raise  # (ViT reads ``projection.weight.dtype``), which a traced part's INT8 modules lack
            try:
                traced = fx_shapes.trace_at_shapes(root, example, constants, self._recorded, "The INT8 model")
            except Exception:
                raise plain from None  # the shape-specialised trace fails too: report the plain one
            if not self._varying_axes() <= traced.meta[fx_shapes.FREE_AXES]:
                raise plain  # its graph depends on a size that differs between calibration batches
            return traced

    @functools.cache  # noqa: B019 (one adapter holds its data anyway)
    def _varying_axes(self) -> frozenset[int]:
        """The input axes whose size differs between calibration batches."""
        shapes = [_input_shapes(model_inputs(batch)) for batch in iterate_batches(self._calib_data)]
        varying: set[int] = set()
        for other in shapes[1:]:
            if len(other) != len(shapes[0]):
                return frozenset({-1})  # another number of inputs: no axis to compare
            for a, b in zip(other, shapes[0], strict=True):
                varying |= _differing_axes(a, b)
        return frozenset(varying)

    def _discover(self, unit: Unit) -> tuple[list[OpInfo], list[UnsupportedOp]]:
        """Ops that really become INT8 in the converted graph (module types alone can mislead)."""
        prepared = unit.recording
        static = dict(_convert(copy.deepcopy(prepared)).named_modules(remove_duplicate=False))
        dynamic_prepared = _prepare(unit.module, unit.example, _dynamic_mapping(_PER_CHANNEL_WEIGHT), unit.numbers)
        dynamic = dict(_convert(dynamic_prepared).named_modules(remove_duplicate=False))
        modules = dict(prepared.named_modules(remove_duplicate=False))
        observers = {n for n in prepared.graph.nodes if isinstance(_module_of(prepared, n), ObserverBase)}
        ops, unsupported = [], []
        for node in prepared.graph.nodes:
            op_name = None
            if node.op == "call_module":
                if isinstance(modules[node.target], ObserverBase):
                    continue
                if isinstance(modules[node.target], NO_OPS):  # in the flow, never an op
                    op_name = None
                elif _is_quantized(static.get(node.target)):
                    approaches = ("static", "dynamic") if _is_quantized(dynamic.get(node.target)) else ("static",)
                    op_name = unit.op_name(node.target)
                    ops.append(OpInfo(op_name, type(static[node.target]).__name__, approaches))
                elif any(True for _ in modules[node.target].parameters(recurse=False)):
                    unsupported.append(UnsupportedOp(unit.op_name(node.target), type(modules[node.target]).__name__,
                                                     "no INT8 kernel in the x86 backend; runs FP32"))
            elif node.op == "call_function":
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
                unit.nodes[op_name] = node.name
                unit.node_ops[node.name] = op_name
            inputs = tuple(a.args[0].name if a in observers else a.name for a in node.all_input_nodes)
            unit.flow.append(FlowStep(node.name, op_name, inputs))
        return ops, unsupported

    def _with_bf16(self, ops: list[OpInfo], examples: dict[str, tuple[tuple, dict]]) -> list[OpInfo]:
        """``ops`` with the BF16/FP32 latency of each Linear that falls back faster in BF16
        (measured on its calibration input; adapters/fx_bf16.py)."""
        linears, modules = {}, dict(self._model.named_modules())
        for op in ops:  # a functional linear's op is named after its node, not a module
            module = modules.get(op.name)
            if type(module) is nn.Linear and op.name in examples and examples[op.name][0]:
                linears[op.name] = (module, examples[op.name][0][0])
        self.bf16_measured = measure_bf16(linears)  # empty where the CPU has no native BF16
        ratios = {name: r.ratio for name, r in self.bf16_measured.items() if faster(r)}
        # op name -> (unit path, module target in the unit's graph): where build swaps in the BF16 form
        # (every measured Linear: a saved config may name one that this machine's timing does not offer)
        self._bf16 = {unit.op_name(target): (unit.path, target) for unit in self._units
                      for target, _ in unit.recording.named_modules() if unit.op_name(target) in self.bf16_measured}
        return [replace(op, bf16_ratio=ratios[op.name]) if op.name in ratios else op for op in ops]

    # --- calibration ----------------------------------------------------------------------------
    @contextmanager
    def _observation(self) -> Iterator[Observation]:
        """The model with each unit's recording graph, its observers feeding one TensorStats per tensor."""
        stats: dict[str, TensorStats] = {}
        smoothed = {_stats_key(u, g.tensor) for u in self._units for g in self._smooth_groups[u.path]}
        for key, observer in self._recording_observers():
            if observer.stats is not None:
                # Same-scale ops (max-pool, flatten) share their input's observer: same range.
                stats.setdefault(key, observer.stats)
            elif key not in stats:  # a tensor observed twice is recorded once
                observer.stats = stats[key] = TensorStats(channels=key in smoothed)
        model = self._assemble(self._model, {u.path: u.recording for u in self._units}, copy_root=False)
        try:
            yield stats, lambda batch, _index: self._run(model, model_inputs(batch))
        finally:
            for _, observer in self._recording_observers():
                observer.stats = None

    def _stat_keys(self) -> set[str]:
        return {key for key, _ in self._recording_observers()}

    def _recording_observers(self) -> Iterator[tuple[str, _RecordingObserver]]:
        """(statistics key, observer) of every recording observer, in graph order."""
        for unit in self._units:
            for node in unit.recording.graph.nodes:
                if isinstance(observer := _module_of(unit.recording, node), _RecordingObserver):
                    yield _stats_key(unit, node.args[0].name), observer

    # --- candidates -----------------------------------------------------------------------------
    def build(self, config: QuantConfig) -> nn.Module:
        return self._build(config, None)

    def build_for_outputs(self, config: QuantConfig) -> nn.Module:
        """With the packed INT8 weights of earlier candidates reused (``fx_lowering``): a oneDNN
        packed conv keeps one primitive, for the input shape, quantization and threads of its first
        run, and a candidate run otherwise after it may run slower (measured: 1.25x on a depthwise
        CNN after a tuning run), so a model that is timed or returned packs its own."""
        return self._build(config, self._packed)

    def _build(self, config: QuantConfig, packed: PackedWeights | None) -> nn.Module:
        self._ready(config)
        converted = {}
        bf16 = self.space.bf16_of(config)
        for unit in self._units:
            if unit.nodes.keys() <= config.fp32_ops and not unit.nodes.keys() & bf16:
                continue  # every op FP32: the float part, as the model's copy holds it (no convert)
            candidate = _shared_copy(self._family(unit, config))
            symmetric = config.scheme == "symmetric"
            for node in candidate.graph.nodes:
                if isinstance(observer := _module_of(candidate, node), _RangeObserver):
                    key = _stats_key(unit, node.args[0].name)
                    # an op's calibration override applies to the tensors it reads
                    readers = [unit.node_ops[u.name] for u in node.users if u.name in unit.node_ops]
                    observer.set_range(*self._range(key, calibration_for(config, readers), symmetric))
            fp32 = [unit.nodes[name] for name in config.fp32_ops if name in unit.nodes]
            fp32 = fp32 if config.approach == "dynamic" else unit.fp32_nodes(config.fp32_ops)
            qconfigs = candidate.meta["_observed_graph_module_attrs"].node_name_to_qconfig
            for node in fp32:
                qconfigs[node] = None
            smoothing = self._smooth(unit, candidate, config, set(fp32))
            try:
                with reusing_packed_weights(packed) if packed is not None else contextlib.nullcontext():
                    converted[unit.path] = _convert(candidate)
                int8_padding(converted[unit.path])
                for i, (linears, inverse) in enumerate(smoothing):
                    divide_inputs(converted[unit.path], linears, inverse, f"_autoquant_smooth_{i}")
                if config.approach == "dynamic":
                    _strip_dynamic_qdq(converted[unit.path])
                    if full_range_is_exact():  # 8-bit activations where the kernel cannot saturate
                        use_full_range(converted[unit.path])
                if bf16:
                    self._to_bf16(unit, converted[unit.path], bf16)
                if unit.path == "":
                    fx_graph.restore_output_class(converted[unit.path], self._output_class)
            except Exception as exc:
                raise BackendError(f"convert_fx failed for {config.describe()}: {first_line(exc, 300)}") from exc
        return _with_device_anchor(self._assemble(self._model, converted, copy_root=True))

    def _to_bf16(self, unit: Unit, converted: fx.GraphModule, bf16_ops: frozenset[str]) -> None:
        """The FP32 Linears of ``unit`` built in BF16, swapped for their BF16 form."""
        for name in bf16_ops:
            path, target = self._bf16.get(name, (None, ""))
            linear = converted.get_submodule(target) if path == unit.path else None
            if type(linear) is nn.Linear:
                if name not in self._bf16_modules:
                    self._bf16_modules[name] = BF16Linear(linear)
                converted.set_submodule(target, self._bf16_modules[name])

    def _smooth(self, unit: Unit, candidate: fx.GraphModule, config: QuantConfig,
                fp32: set[str]) -> list[tuple[tuple[str, ...], torch.Tensor]]:
        """Smooth the INT8 Linears of each group in ``candidate`` (weights and input range); the
        (Linears, 1 / s) whose input the converted graph must divide by ``s``."""
        alpha = config.smooth_alpha
        if alpha is None:
            return []
        nodes = {str(n.target): n for n in candidate.graph.nodes if n.op == "call_module"}
        observers = {n.args[0].name: observer for n in candidate.graph.nodes
                     if isinstance(observer := _module_of(candidate, n), _RangeObserver)}
        todo = []
        for group in self._smooth_groups[unit.path]:
            int8 = {t: linear for t in group.linears if nodes[t].name not in fp32
                    and isinstance(linear := candidate.get_submodule(t), nn.Linear)}  # smoothing_groups: Linears
            if not int8 or group.tensor not in observers:
                continue
            stats = self._statistics()[_stats_key(unit, group.tensor)]
            inverse, weights = self._smoother.scales((unit.path, group.tensor, tuple(int8), alpha), stats, int8, alpha)
            for target, weight in weights.items():
                candidate.get_submodule(target).weight = weight
            observers[group.tensor].set_range(*smoothed_range(stats, inverse.numpy(), config.scheme == "symmetric"))
            todo.append((tuple(int8), inverse))
        return todo

    def _family(self, unit: Unit, config: QuantConfig) -> fx.GraphModule:
        """The unit prepared once for the config's approach, scheme and weight granularity."""
        family = (config.approach, config.scheme, config.granularity)
        if family not in unit.prepared:
            weight = self._weights[config.granularity].factory()
            if config.approach == "dynamic":
                mapping = _dynamic_mapping(weight)
            else:
                activation = _RangeObserver.with_args(
                    dtype=torch.quint8,
                    qscheme=torch.per_tensor_symmetric if config.scheme == "symmetric" else torch.per_tensor_affine,
                )
                mapping = _static_mapping(QConfig(activation, weight))
            unit.prepared[family] = _prepare(unit.module, unit.example, mapping, unit.numbers)
        return unit.prepared[family]

    @staticmethod
    def _assemble(model: nn.Module, parts: Mapping[str, nn.Module], *, copy_root: bool) -> nn.Module:
        """The model with each unit replaced by its prepared or converted form."""
        if "" in parts:
            return parts[""]
        root = copy.deepcopy(model) if copy_root else _shallow_tree_copy(model, parts)
        for path, module in parts.items():
            parent, _, child = path.rpartition(".")
            _keep_attributes(module, model.get_submodule(path))
            # torch.nn's fused fast paths (TransformerEncoderLayer, MultiheadAttention) read the
            # float weights of their children and skip calling them, unless a hook is attached.
            module.register_forward_pre_hook(lambda *_: None)  # any hook will do
            setattr(root.get_submodule(parent), child, module)
        return root

    def _as_inputs(self, batch: Any, index: int) -> Example:
        return model_inputs(batch)

    @staticmethod
    def _run(model: nn.Module, example: Example) -> Any:
        args, kwargs = example
        with torch.inference_mode():
            return model(*args, **kwargs)

    # --- files ----------------------------------------------------------------------------------
    def save_model(self, model: nn.Module, directory: Path) -> Path:
        """TorchScript, so that plain ``torch.jit.load`` runs it (quantized GraphModules do not pickle).

        Dict outputs (every Hugging Face model) are traced with ``strict=False``; the output class
        (e.g. a ``ModelOutput``) is stored beside the graph so that ``load_model`` restores it."""
        path = Path(directory) / MODEL_FILE
        args, kwargs = self._example
        with torch.no_grad():
            output = model(*args, **kwargs)
            scripted = torch.jit.trace(model, args or None, example_kwarg_inputs=kwargs or None, strict=False)
        kind = type(output)
        extra = {OUTPUT_CLASS: f"{kind.__module__}:{kind.__qualname__}"} if isinstance(output, dict) else {}
        torch.jit.save(scripted, str(path), _extra_files=extra)
        return path

    @classmethod
    def load_model(cls, path: Path) -> nn.Module:
        torch.backends.quantized.engine = ENGINE
        extra = {OUTPUT_CLASS: ""}
        scripted = torch.jit.load(str(path), _extra_files=extra)
        if not extra[OUTPUT_CLASS]:
            return scripted
        return _DictOutput(scripted, pkgutil.resolve_name(_text(extra[OUTPUT_CLASS])))


class _DictOutput(nn.Module):
    """A traced model whose dict output is rebuilt as the original model's output class."""

    def __init__(self, scripted: torch.jit.ScriptModule, output_class: type) -> None:
        super().__init__()
        self.scripted, self.output_class = scripted, output_class

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.output_class(**self.scripted(*args, **kwargs))


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


@functools.cache
def _backend_config() -> BackendConfig:
    """The x86 backend config, with ``F.pad`` running on INT8 tensors: torch pads a quantized
    tensor with the real value (0 becomes the zero point), so the padding shares its input's
    quantization instead of running FP32 between dequantize and quantize before each conv
    (TF-style padding)."""
    config = get_x86_backend_config()
    shared = next(p for p in config.configs if p.pattern is torch.flatten)  # a same-qparams op
    return config.set_backend_pattern_config(
        BackendPatternConfig(nn.functional.pad).set_observation_type(shared.observation_type)
        .set_dtype_configs(shared.dtype_configs))


def _static_mapping(qconfig: QConfig) -> QConfigMapping:
    """``qconfig`` everywhere but on the x86 backend's fixed-qparams ops (sigmoid, softmax, tanh,
    hardsigmoid), whose INT8 kernels need their fixed output ranges (torch warns and leaves them
    FP32 otherwise)."""
    mapping = QConfigMapping().set_global(qconfig)
    for op, observer in _FIXED_QPARAMS_OP_TO_OBSERVER.items():
        mapping.set_object_type(op, QConfig(observer, qconfig.weight))
    return mapping


def _dynamic_mapping(weight: Any) -> QConfigMapping:
    activation = PlaceholderObserver.with_args(dtype=torch.quint8, quant_min=0, quant_max=255, is_dynamic=True)
    # Global: the backend only has dynamic kernels for Linear (and fused Linear+ReLU needs one qconfig).
    mapping = QConfigMapping().set_global(QConfig(activation, weight))
    for op in _FIXED_QPARAMS_OP_TO_OBSERVER:
        mapping.set_object_type(op, None)  # no dynamic kernels: FP32, without torch's warning
    return mapping


def _prepare(module: fx.GraphModule, example: Example, mapping: QConfigMapping,
             numbers: frozenset[str] = frozenset()) -> fx.GraphModule:
    """prepare_fx, without observers on ``numbers`` (nodes whose value is not a tensor)."""
    args, kwargs = example
    positional = inspect.signature(module.forward).bind(*args, **kwargs).args
    with warnings.catch_warnings():  # prepare_fx/convert_fx are deprecated in favour of PT2E
        warnings.simplefilter("ignore", DeprecationWarning)
        prepared = prepare_fx(copy.deepcopy(module), mapping, positional, backend_config=_backend_config())
    _drop_observers(prepared, numbers)
    return prepared


def _numbers(recording: fx.GraphModule) -> frozenset[str]:
    """Nodes whose observer saw a number, not a tensor, when the recording graph ran: torch.ao
    observes a scale computed from a shape (``(d // heads) ** -0.5``) as if it were an activation."""
    return frozenset(node.args[0].name for node in recording.graph.nodes
                     if isinstance(observer := _module_of(recording, node), _RecordingObserver)
                     and observer.saw_non_tensor)


def _drop_observers(prepared: fx.GraphModule, sources: frozenset[str]) -> None:
    """Remove the observers of the nodes named in ``sources``: the op reading such a value takes it as
    it is (it is no op of the space: not all its inputs are quantized)."""
    dropped = False
    for node in list(prepared.graph.nodes):
        if (isinstance(_module_of(prepared, node), ObserverBase) and node.args
                and isinstance(node.args[0], fx.Node) and node.args[0].name in sources):
            node.replace_all_uses_with(node.args[0])
            prepared.graph.erase_node(node)
            dropped = True
    if dropped:
        prepared.delete_all_unused_submodules()
        prepared.recompile()


def _convert(prepared: fx.GraphModule) -> fx.GraphModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return convert_fx(prepared)


def _shared_copy(prepared: fx.GraphModule) -> fx.GraphModule:
    """A copy of a prepared graph to convert: new modules, graph and metadata, the same tensors
    (convert creates new quantized weights and never writes into the float ones)."""
    memo = {id(t): t for t in prepared.state_dict(keep_vars=True).values()}
    return copy.deepcopy(prepared, memo)


def _none_arguments(module: nn.Module, example: tuple[tuple, dict]) -> dict[str, None]:
    """Forward arguments passed as None: traced as constants, so ``if mask is not None`` branches
    are decided the way the model is really called."""
    args, kwargs = example
    bound = inspect.signature(module.forward).bind(*args, **kwargs)
    bound.apply_defaults()
    return {name: None for name, value in bound.arguments.items() if value is None}


def _input_shapes(example: tuple[tuple, dict]) -> list[tuple[int, ...]]:
    return [tuple(t.shape) for t in torch.utils._pytree.tree_leaves(example) if isinstance(t, torch.Tensor)]


def _differing_axes(a: tuple[int, ...], b: tuple[int, ...]) -> set[int]:
    if len(a) != len(b):
        return {-1}  # another rank: never specialised
    return {axis for axis, (x, y) in enumerate(zip(a, b, strict=True)) if x != y}


def _stats_key(unit: Unit, node_name: str) -> str:
    return f"{unit.path}/{node_name}"


def _strip_dynamic_qdq(graph_module: fx.GraphModule) -> None:
    """Remove the quantize_per_tensor_dynamic -> dequantize pairs that convert leaves in front of
    ops whose qconfig was set to None (FP32 fallback): a lowered dynamic kernel absorbs its own
    pair, so any pair still in the graph only adds rounding error to an FP32 op's input."""
    graph = graph_module.graph
    for node in list(graph.nodes):
        if node.op == "call_method" and node.target == "dequantize":
            source = node.args[0]
            if isinstance(source, fx.Node) and source.target is torch.quantize_per_tensor_dynamic:
                node.replace_all_uses_with(source.args[0])
                graph.erase_node(node)
                if not source.users:
                    graph.erase_node(source)
    graph.lint()
    graph_module.recompile()


def _with_device_anchor(model: nn.Module) -> nn.Module:
    """Give each module with a ``device`` property and no float parameter left an empty one.

    Hugging Face's ``model.device`` (read by pipelines, and probed by ``torch.jit.trace``) is
    ``next(self.parameters())``: on a fully quantized model it raises StopIteration.
    """
    for module in model.modules():
        if isinstance(getattr(type(module), "device", None), property) and next(module.parameters(), None) is None:
            module.register_parameter("_autoquant_device_anchor", nn.Parameter(torch.empty(0), requires_grad=False))
    return model


def _module_of(graph_module: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return graph_module.get_submodule(str(node.target)) if node.op == "call_module" else None


def _is_quantized(module: nn.Module | None) -> bool:
    return module is not None and type(module).__module__.startswith(
        ("torch.ao.nn.quantized", "torch.ao.nn.intrinsic.quantized")
    )


def _is_observed(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether the prepared graph quantizes all tensor inputs of the op (its output may be observed
    after a fused ReLU, as in add+relu)."""
    inputs = node.all_input_nodes
    return bool(inputs) and all(
        n.op == "call_module" and isinstance(modules.get(str(n.target)), ObserverBase) for n in inputs
    )


def _shallow_tree_copy(model: nn.Module, parts: Mapping[str, nn.Module]) -> nn.Module:
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


def _keep_attributes(unit: nn.Module, original: nn.Module) -> None:
    """Plain attributes of a replaced leaf (a conv's stride, kernel_size...) and its float weights,
    which some models' code reads from the module (Hugging Face's TF-style padding, ViT's
    ``projection.weight.dtype``). The weights are unregistered: the unit's own ones run."""
    if list(original.children()):
        return
    for name, value in vars(original).items():
        if not name.startswith("_") and isinstance(value, (int, float, str, bool, tuple)) and not hasattr(unit, name):
            setattr(unit, name, value)
    for name, tensor in original.named_parameters(recurse=False):
        if not hasattr(unit, name):
            object.__setattr__(unit, name, tensor)
