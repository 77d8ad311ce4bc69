"""ONNX models quantized to QDQ form and run by ONNX Runtime's CPU kernels.

Calibrate once, build many: the model is run once over the calibration data with the tensors the
quantizer needs exposed as extra graph outputs, each batch feeding autoquant's own streaming
``TensorStats`` (bounded memory, any shapes, non-finite values skipped and reported). Every
candidate is then written by onnxruntime.quantization's quantizer (``QDQQuantizer`` for static,
``ONNXQuantizer`` in IntegerOps mode for dynamic) from ranges computed from those statistics:
no data pass and no ORT calibrator per candidate.

The model first goes through ORT's basic graph optimisations (constants folded, Pad and
BatchNorm fused into Conv), so the quantizer sees the graph ORT would run.

Searched: every MatMul (weight MatMuls, and activation-by-activation ones listed as
"MatMul(act x act)"), Gemm and Conv. MatMul outputs stay float (ORT fuses DQ->MatMul into
MatMulIntegerToFloat); Conv and Gemm outputs are quantized, and the FOLLOWERS (Relu, pools, Add,
Mul, Sigmoid, Concat, ...) whose float inputs are all INT8 in a candidate run INT8 too, so that ORT
fuses them into QLinear kernels instead of running them in float between DequantizeLinear and
QuantizeLinear. Dynamic quantization covers weight MatMuls (activations quantized at run time);
the activation-by-activation MatMuls of a dynamic candidate are static QDQ with min-max ranges
(MatMulIntegerToFloat: 0.93 of the latency of leaving them FP32 on MiniLM). Dynamic is tried first
on models whose INT8 ops are all MatMuls, where it is the faster kernel on CPU. Residual Adds, LayerNorm,
Softmax and GELU of a transformer are not searched: in INT8 they only slow ORT down (measured in
docs/onnx-int8-kernels.md). Static candidates may smooth weight-MatMul inputs first (SmoothQuant,
the ``smooth_alpha`` knob; adapters/onnx_smoothing.py), from per-channel statistics of the same
calibration pass. ORT's CPU EP has no BF16 MatMul/Gemm, so FP32 is the only fallback precision.

What eval_fn receives is an ``ORTSession``: a plain ``onnxruntime.InferenceSession`` (CPU, graph
optimisations on, so Q/DQ pairs fuse into INT8 kernels at creation) that also carries the
``onnx.ModelProto`` it was created from in ``.model_proto``. ``TuneResult.model`` is that
ModelProto (see ``result_model``), written by ``save_model`` as ``model.onnx``; ``load_model``
returns an ``onnx.ModelProto`` (run it with ``onnxruntime.InferenceSession(proto.SerializeToString())``).
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto
from onnxruntime.quantization import QuantType, qdq_quantizer
from onnxruntime.quantization.calibrate import CalibrationMethod as ORTCalibrationMethod
from onnxruntime.quantization.calibrate import TensorData, TensorsData
from onnxruntime.quantization.onnx_quantizer import ONNXQuantizer
from onnxruntime.quantization.qdq_quantizer import QDQQuantizer
from onnxruntime.quantization.quant_utils import QuantizationMode, add_infer_metadata

from autoquant.calibration import (
    OVERCLIP_FACTOR,
    OVERCLIP_SHARE,
    TensorStats,
    overclipping,
)
from autoquant.errors import BackendError, CalibrationDataError, ConfigError, did_you_mean, first_line
from autoquant.smoothing import ALPHAS
from autoquant.space import OpInfo, QuantConfig, Space, UnsupportedOp

from . import is_onnx_path
from .base import Observation, TensorStatsAdapter, calibration_for
from .onnx_smoothing import smooth, smoothing_groups

log = logging.getLogger("autoquant")

MODEL_FILE = "model.onnx"
ACT_X_ACT = "MatMul(act x act)"
# Not searched: quantized only where every activation they read already is INT8 (after an INT8
# Conv/Gemm or another follower), so that a CNN stays in INT8 between convolutions instead of
# paying a dequantize/quantize per op, while a transformer's float MatMul outputs keep their
# Adds and Muls in float.
# Measured on random-init HF EfficientNet (SiLU = Sigmoid * x, squeeze-and-excitation) at batch 8:
# INT8/FP32 latency 0.93-1.04 with only Relu/Clip/pools following, 0.60 with Mul, Sigmoid, Add too,
# since each float op between INT8 convs costs a DequantizeLinear and a QuantizeLinear.
FOLLOWERS = ("Relu", "Clip", "MaxPool", "AveragePool", "GlobalAveragePool", "Flatten", "Pad", "Add", "Mul",
             "Sigmoid", "HardSigmoid", "Concat", "Resize", "Reshape", "Transpose", "Squeeze", "Unsqueeze")
MIN_OPSET = 10  # QuantizeLinear/DequantizeLinear
PER_CHANNEL_OPSET = 13  # per-axis QuantizeLinear
MAX_OPSET = 21


class ORTSession(ort.InferenceSession):
    """An ``onnxruntime.InferenceSession`` that keeps the ModelProto it runs (``model_proto``).

    Its intra-op threads do not spin after a run: spinning threads of one session take the cores
    from the next session's run, so in interleaved FP32/INT8 pairs whichever ran second was up to
    1.9x slower (BERT, 2 cores) and latency ratios swung 0.5 to 1.4 with the order."""

    def __init__(self, model_proto: onnx.ModelProto) -> None:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # ORT warns about every unfused QDQ pair on stderr otherwise
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        super().__init__(model_proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
        self.model_proto = model_proto


class _WeightCachingQDQQuantizer(QDQQuantizer):
    """QDQQuantizer that reuses weight scales/zero points across candidates: computing them channel
    by channel is most of a build (~1 s of ~2 s on MiniLM). Keyed by (weight, axis); weights are
    always int8 symmetric here, so nothing else changes them."""

    tensors_to_quantize: dict[str, Any]  # QDQQuantizer's; narrowed to the uncached weights below

    def __init__(self, *args: Any, weight_params: dict, **kwargs: Any) -> None:
        self._weight_params = weight_params
        super().__init__(*args, **kwargs)
        # ORT's ONNXModel scans the whole graph for each quantized tensor: a build on a CNN of 82 convs
        # spent more time there than quantizing. Same edits, found through an index.
        graph = self.model.model.graph
        self.model.replace_input_of_all_nodes = _ConsumerIndex(graph).replace
        self.model.initializer_extend = partial(_append_initializers, self.model)

    def _calc_initializer_quant_params(self) -> dict:
        every = self.tensors_to_quantize
        key = lambda name: (name, every[name].axis)  # noqa: E731
        self.tensors_to_quantize = {n: info for n, info in every.items() if key(n) not in self._weight_params}
        try:
            for name, params in super()._calc_initializer_quant_params().items():
                self._weight_params[key(name)] = params
        finally:
            self.tensors_to_quantize = every
        # Copies: the int32-bias adjustment edits a weight's scale in place, per candidate.
        return {n: copy.deepcopy(self._weight_params[key(n)]) for n in every if key(n) in self._weight_params}


class ONNXAdapter(TensorStatsAdapter):
    """Quantizes an ONNX model (``onnx.ModelProto`` or a path to a ``.onnx`` file) for ONNX Runtime's CPU.

    Calibration batches are dicts mapping input names to numpy arrays, tuples/lists of arrays in
    the model's input order, or one array for a one-input model. The first batch is the latency
    input. Activations are uint8 and weights int8 (the fast path on x86; int8/int8 is slower).
    """

    name = "onnx"
    batch_hint = "Check the batch's shapes and dtypes against the model inputs."

    @classmethod
    def accepts(cls, model: Any) -> bool:
        return isinstance(model, onnx.ModelProto) or is_onnx_path(model)

    def __init__(self, model: onnx.ModelProto | str | os.PathLike, calib_data: Iterable[Any]) -> None:
        original = _load(model)
        _check(original)
        proto = _basic_optimized(original)
        self._proto = proto
        # The quantizer needs every tensor's type: infer once, not per candidate. Tagged as ORT's own
        # loader tags it, or every quantizer saves, re-infers and reloads the model (a third of a build).
        self._inferred = onnx.shape_inference.infer_shapes(proto)
        add_infer_metadata(self._inferred)
        try:
            self._fp32 = ORTSession(proto)
        except Exception as exc:  # ORT's messages name the node or op it cannot load
            raise BackendError(f"ONNX Runtime cannot load this model: {first_line(exc)}") from exc
        self._inputs = [(i.name, i.type, i.shape) for i in self._fp32.get_inputs()]
        super().__init__(calib_data)
        self._weight_params: dict[tuple[str, int | None], Any] = {}
        self._quantized_weights: dict[tuple, TensorProto] = {}
        ops, unsupported, self._tensors, self._followers = _discover(self._inferred)
        unsupported += _folded_away(original, proto)
        if not ops:
            raise BackendError(
                "Nothing in this ONNX model can be quantized: no MatMul, Gemm or Conv with INT8 kernels was found."
                + "".join(f" {u.name}: {u.reason}." for u in unsupported)
            )
        self._smooth_groups = smoothing_groups(self._inferred)
        self._op_types = {op.name: op.op_type for op in ops}
        self._node_types = {n.name: n.op_type for n in self._inferred.graph.node}
        opset = _default_opset(proto)
        granularities = ("per_channel", "per_tensor") if opset >= PER_CHANNEL_OPSET else ("per_tensor",)
        if opset < PER_CHANNEL_OPSET:
            log.info("Opset %d < %d: per-channel weights need opset 13, so only per-tensor is searched.",
                     opset, PER_CHANNEL_OPSET)
        approaches = ("static", "dynamic") if any(op.op_type == "MatMul" for op in ops) else ("static",)
        if all(op.op_type in ("MatMul", ACT_X_ACT) for op in ops) and len(approaches) == 2:
            # Transformer-like (INT8 only in MatMuls): ORT's fused dynamic MatMul beats the static QDQ
            # graph on CPU (MiniLM: 0.50 vs 0.54 of FP32 latency at batch 1, 0.53 vs 0.68 at batch 32),
            # so dynamic is the preferred value, tried first.
            approaches = ("dynamic", "static")
        # SmoothQuant (static only): off first, so the default candidate is plain static INT8.
        alphas = ALPHAS if self._smooth_groups and "static" in approaches else (None,)
        self.space = Space(ops=tuple(ops), approaches=approaches, granularities=granularities,
                           smooth_alphas=alphas, unsupported=tuple(unsupported))

    @property
    def fp32_model(self) -> ORTSession:
        return self._fp32

    # --- calibration data ------------------------------------------------------------------------
    def _as_inputs(self, batch: Any, index: int) -> dict[str, np.ndarray]:
        """A calibration batch as ORT feeds, checked against the model's inputs."""
        names = [name for name, _, _ in self._inputs]
        if isinstance(batch, Mapping):
            unknown = [k for k in batch if k not in names]
            if unknown:
                raise CalibrationDataError(
                    f"Calibration batch {index} has input '{unknown[0]}', which the model does not have."
                    f"{did_you_mean(unknown[0], names)} "
                    f"The model's inputs: {', '.join(names)}."
                )
            values = dict(batch)
        elif isinstance(batch, (tuple, list)):
            if len(batch) != len(names):
                raise CalibrationDataError(
                    f"Calibration batch {index} is a sequence of {len(batch)} item(s) but the model has "
                    f"{len(names)} input(s) ({', '.join(names)}): give them in that order, or a dict by name."
                )
            values = dict(zip(names, batch, strict=False))
        else:
            if len(names) != 1:
                raise CalibrationDataError(
                    f"Calibration batch {index} is one array but the model has {len(names)} inputs "
                    f"({', '.join(names)}): give a dict by input name."
                )
            values = {names[0]: batch}
        feeds = {}
        for name, type_text, shape in self._inputs:
            if name not in values:
                raise CalibrationDataError(
                    f"Calibration batch {index} lacks the model input '{name}' (it has {', '.join(map(str, values))})."
                )
            feeds[name] = _as_array(values[name], name, type_text, shape, index)
        return feeds

    # --- calibration -----------------------------------------------------------------------------
    @contextmanager
    def _observation(self) -> Iterator[Observation]:
        """The model with every tensor the quantizer needs a range for exposed as an output."""
        names = sorted(self._tensors)
        augmented = onnx.ModelProto()
        augmented.CopyFrom(self._proto)
        existing = {o.name for o in augmented.graph.output}
        for name in names:
            if name not in existing:
                augmented.graph.output.append(onnx.helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
        session = ORTSession(augmented)
        smoothed = {g.activation for g in self._smooth_groups}
        stats = {name: TensorStats(channels=name in smoothed) for name in names}

        def observe(batch: Any, index: int) -> None:
            outputs = session.run(names, self._as_inputs(batch, index))
            for name, value in zip(names, outputs, strict=False):
                stats[name].update(value)  # one batch at a time: memory stays O(tensors x bins)

        yield stats, observe

    def _stat_keys(self) -> set[str]:
        return set(self._tensors)

    def _calibrated(self, stats: dict[str, TensorStats]) -> None:
        """One log line naming the tensors where a method's range clips far more than the others',
        under the preferred scheme (the ranges are cached for the builds that use them)."""
        scheme = self.space.schemes[0]
        flagged = overclipping(stats, list(self.space.calibrations),
                               ranges=lambda t, m: self._range(t, m, scheme == "symmetric"))
        lines = [f"{method}/{scheme} on {len(ts)}: {', '.join(ts)}" for method, ts in sorted(flagged.items())]
        if lines:
            log.warning("Calibration methods clipping far more values than the others (over %.1f%% and %gx any "
                        "other method) on these tensors: %s.", 100 * OVERCLIP_SHARE, OVERCLIP_FACTOR, "; ".join(lines))

    # --- candidates ------------------------------------------------------------------------------
    def build(self, config: QuantConfig) -> ORTSession:
        stats = self._ready(config)
        model = onnx.ModelProto()
        model.CopyFrom(self._inferred)  # the quantizers edit the model they are given
        per_channel = config.granularity == "per_channel"
        try:
            if config.approach == "dynamic":
                model = self._static_act_x_act(model, config)
                exclude = [name for name, t in self._op_types.items() if t != "MatMul" or name in config.fp32_ops]
                quantizer = ONNXQuantizer(
                    model, per_channel, False, QuantizationMode.IntegerOps, False, QuantType.QInt8, QuantType.QUInt8,
                    None, [], exclude, ["MatMul"],
                    # The Q/DQ tensors of the act x act MatMuls carry no inferred type: they are float.
                    {"MatMulConstBOnly": True, "DefaultTensorType": TensorProto.FLOAT},
                )
            else:
                symmetric = config.scheme == "symmetric"
                smoothed: dict[str, tuple[float, float]] = {}
                if config.smooth_alpha is not None:
                    model, smoothed = smooth(model, self._smooth_groups, stats, config.smooth_alpha, symmetric)
                # An all-FP32 candidate leaves no follower INT8: it is the FP32 model.
                nodes = [*self._op_types, *_int8_followers(self._followers, config.fp32_ops)]
                quantizer = _WeightCachingQDQQuantizer(
                    model, per_channel, False, QuantType.QInt8, QuantType.QUInt8,
                    self._tensor_ranges(config, symmetric, smoothed),  # fresh: the quantizer adjusts it in place
                    nodes, sorted(config.fp32_ops), sorted({self._node_types[n] for n in nodes}),
                    {"ActivationSymmetric": symmetric, "OpTypesToExcludeOutputQuantization": ["MatMul"]},
                    weight_params=self._weight_params,
                )
            with _reusing_quantized_weights(self._quantized_weights):
                quantized = self._quiet(quantizer)
        except Exception as exc:
            raise BackendError(f"onnxruntime.quantization failed for {config.describe()}: {first_line(exc)}") from exc
        try:
            return ORTSession(quantized)
        except Exception as exc:
            raise BackendError(
                f"ONNX Runtime cannot load the {config.describe()} candidate: {first_line(exc)}"
            ) from exc

    def _static_act_x_act(self, model: onnx.ModelProto, config: QuantConfig) -> onnx.ModelProto:
        """The act x act MatMuls of a dynamic candidate as static QDQ (min-max, uint8): ORT has no
        dynamic kernel for them, and MatMulIntegerToFloat beats their float MatMul."""
        nodes = [n for n, t in self._op_types.items() if t == ACT_X_ACT and n not in config.fp32_ops]
        if not nodes:
            return model
        ranges = self._tensor_ranges(QuantConfig(calibration="minmax"), False, {})
        quantizer = QDQQuantizer(model, False, False, QuantType.QInt8, QuantType.QUInt8, ranges, nodes, [],
                                 ["MatMul"], {"OpTypesToExcludeOutputQuantization": ["MatMul"]})
        return self._quiet(quantizer)

    @staticmethod
    def _quiet(quantizer: Any) -> onnx.ModelProto:
        with _without_quantizer_info():
            return quantizer.quantize_model()

    def _tensor_ranges(self, config: QuantConfig, symmetric: bool,
                       smoothed: dict[str, tuple[float, float]]) -> TensorsData:
        """(lo, hi) per tensor from the cached statistics; an op's calibration override applies to
        the activations it reads (a tensor read by several INT8 ops takes the first override).
        ``smoothed``: the ranges of smoothed activations (min-max, see onnx_smoothing)."""
        # A tensor smoothed in place (folded into a LayerNorm) takes its smoothed range.
        ranges = smoothed | {t: self._range(t, calibration_for(config, readers), symmetric)
                             for t, readers in self._tensors.items() if t not in smoothed}
        data = {t: TensorData(lowest=np.array(lo, dtype=np.float32), highest=np.array(hi, dtype=np.float32))
                for t, (lo, hi) in ranges.items()}
        return TensorsData(ORTCalibrationMethod.MinMax, data)

    @staticmethod
    def _run(model: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> object:
        return model.run(None, feeds)

    def result_model(self, model: ORTSession) -> onnx.ModelProto:
        """What ``TuneResult.model`` holds: the quantized ModelProto (plain ORT runs it)."""
        return model.model_proto

    # --- files -----------------------------------------------------------------------------------
    def save_model(self, model: ORTSession | onnx.ModelProto, directory: Path) -> Path:
        """Writes ``model.onnx`` (a QDQ model any ONNX Runtime loads)."""
        proto = model.model_proto if isinstance(model, ORTSession) else model
        if not isinstance(proto, onnx.ModelProto):
            raise ConfigError(f"save_model needs an ORTSession or onnx.ModelProto, got {type(model).__name__}.")
        path = Path(directory) / MODEL_FILE
        onnx.save(proto, str(path))
        return path

    @classmethod
    def load_model(cls, path: Path) -> onnx.ModelProto:
        """The saved ``onnx.ModelProto``; ``onnxruntime.InferenceSession(str(path))`` runs the file directly."""
        return _load(path)


class _ConsumerIndex:
    """Where each tensor is consumed (node positions), for ONNXModel.replace_input_of_all_nodes while
    the QDQ quantizer rewires a graph that only grows: appended nodes are indexed as they come, a
    shrunk graph is indexed again, and a node is edited only if it still reads the old name."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph, self.indexed = graph, 0
        self.consumers: dict[str, set[int]] = {}

    def replace(self, old: str, new: str) -> None:
        nodes = self.graph.node
        if len(nodes) < self.indexed:  # nodes were removed: positions moved
            self.consumers, self.indexed = {}, 0
        for position in range(self.indexed, len(nodes)):
            for name in nodes[position].input:
                self.consumers.setdefault(name, set()).add(position)
        self.indexed = len(nodes)
        for position in sorted(self.consumers.pop(old, ())):
            node = nodes[position]
            if old in node.input:
                for j, name in enumerate(node.input):
                    if name == old:
                        node.input[j] = new
                self.consumers.setdefault(new, set()).add(position)


def _append_initializers(model: Any, initializers: list[TensorProto]) -> None:
    """ONNXModel.initializer_extend without re-checking every initializer already in the graph."""
    if not initializers:
        raise ValueError("Can add an empty list.")
    for initializer in initializers:
        model.graph().initializer.append(model._check_init(initializer))


def _find_by_name(name: str, items: Iterable[Any]) -> Any:
    """quant_utils.find_by_name, stopping at the first match (ORT's builds a list of them all)."""
    return next((item for item in items if item.name == name), None)


@contextmanager
def _reusing_quantized_weights(cache: dict[tuple, TensorProto]) -> Iterator[None]:
    """ORT's QDQ quantizer quantizes a per-channel weight one channel at a time in Python: ~40% of a
    build on a CNN of 82 convs. The same weight with the same scale and zero point is quantized
    once per adapter (keyed by its bytes: smoothing changes a weight's values, not its name)."""
    quantize, find = qdq_quantizer.quantize_onnx_initializer, qdq_quantizer.find_by_name

    def reused(weight: TensorProto, quant_type: int, zero_point: np.ndarray, scale: np.ndarray,
               axis: int | None = None, quant_weight_name: str | None = None, block_size: int = 0) -> TensorProto:
        data = weight.raw_data or weight.SerializeToString()
        key = (weight.name, hashlib.blake2b(data, digest_size=16).digest(), quant_type, axis, quant_weight_name,
               block_size, np.asarray(scale).tobytes(), np.asarray(zero_point).tobytes())
        if key not in cache:
            cache[key] = quantize(weight, quant_type, zero_point, scale, axis, quant_weight_name, block_size)
        return cache[key]  # the quantizer copies it into its model (protobuf extend)

    qdq_quantizer.quantize_onnx_initializer, qdq_quantizer.find_by_name = reused, _find_by_name
    try:
        yield
    finally:
        qdq_quantizer.quantize_onnx_initializer, qdq_quantizer.find_by_name = quantize, find


@contextmanager
def _without_quantizer_info() -> Iterator[None]:
    """Drop the INFO lines ORT's quantizers log on the root logger (one per unquantized tensor) and
    nothing else: a root-logger filter never sees records of other loggers, and this one passes
    every record that is not ORT's. Also dropped: ONNXQuantizer's "already quantized" warning about
    the act x act QDQ nodes this adapter put there itself (dynamic candidates)."""
    keep = lambda record: "onnxruntime" not in record.pathname or (  # noqa: E731
        record.levelno > logging.INFO and "already quantized" not in record.getMessage())
    logging.root.addFilter(keep)
    try:
        yield
    finally:
        logging.root.removeFilter(keep)


# --- model inspection --------------------------------------------------------------------------------
def _load(model: onnx.ModelProto | str | os.PathLike) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    if not isinstance(model, (str, os.PathLike)):
        raise ConfigError(
            f"The ONNX adapter takes an onnx.ModelProto or a path to a .onnx file, got {type(model).__name__}."
        )
    path = Path(model)
    if not path.is_file():
        raise ConfigError(f"No ONNX file at '{path}'.")
    try:
        proto = onnx.load(str(path))
    except Exception as exc:  # protobuf raises DecodeError, onnx raises others
        raise BackendError(f"'{path}' is not an ONNX model ({first_line(exc)}): export one with torch.onnx.export "
                           "or pass an onnx.ModelProto.") from exc
    if not proto.graph.node:
        raise BackendError(f"'{path}' is not an ONNX model (it parses to an empty graph): check the file.")
    return proto


def _basic_optimized(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The model after ONNX Runtime's basic (semantics-preserving) graph optimisations, as ORT's
    quantization guide advises: constant folding, Pad and BatchNorm fused into Conv, and so on.
    Otherwise the quantizer sees a Pad with computed pads before every convolution of HF
    MobileNetV2, and the INT8 model runs each in float between a DequantizeLinear and a
    QuantizeLinear (1.26x FP32 latency at batch 8 instead of faster)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.log_severity_level = 3
    with tempfile.TemporaryDirectory() as tmp:
        options.optimized_model_filepath = os.path.join(tmp, "basic.onnx")
        try:
            ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT's messages name the node or op it cannot load
            raise BackendError(f"ONNX Runtime cannot load this model: {first_line(exc)}") from exc
        return onnx.load(options.optimized_model_filepath)


def _folded_away(original: onnx.ModelProto, optimized: onnx.ModelProto) -> list[UnsupportedOp]:
    """The MatMul/Gemm/Conv nodes of the model that ``_basic_optimized`` removed: constants folded
    (DeBERTa projects its relative-position embeddings, a weight, by a weight)."""
    kept = {n.name for n in optimized.graph.node}
    return [UnsupportedOp(n.name, n.op_type, "all its inputs are constants: ONNX Runtime's constant folding "
                                             "computes it before quantization; nothing to quantize")
            for n in original.graph.node if n.op_type in ("MatMul", "Gemm", "Conv") and n.name and n.name not in kept]


def _check(proto: onnx.ModelProto) -> None:
    try:
        onnx.checker.check_model(proto, full_check=False)
    except onnx.checker.ValidationError as exc:
        raise BackendError(
            f"The ONNX model fails onnx.checker: {first_line(exc)}. Fix or re-export the model."
        ) from exc
    opset = _default_opset(proto)
    if opset < MIN_OPSET or opset > MAX_OPSET:
        raise BackendError(
            f"The model uses ONNX opset {opset}; quantization here needs opset {MIN_OPSET} to {MAX_OPSET} "
            "(13 or later for per-channel weights). Convert it with onnx.version_converter.convert_version(model, 17)."
        )


def _default_opset(proto: onnx.ModelProto) -> int:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)


@dataclass(frozen=True)
class _Follower:
    """A node that runs INT8 when every activation it reads (``inputs``) is INT8; for a searched
    op ``inputs`` is empty: it runs INT8 unless the candidate puts it in FP32."""

    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


def _int8_followers(followers: list[_Follower], fp32_ops: frozenset[str]) -> list[str]:
    """The followers that run INT8 in a candidate (in graph order, so producers come first)."""
    int8, names = set[str](), []
    for node in followers:
        searched = not node.inputs
        if (searched and node.name not in fp32_ops) or (not searched and all(t in int8 for t in node.inputs)):
            int8.update(node.outputs)
            if not searched:
                names.append(node.name)
    return names


def _discover(
    model: onnx.ModelProto,
) -> tuple[list[OpInfo], list[UnsupportedOp], dict[str, list[str]], list[_Follower]]:
    """Searchable nodes (named if unnamed), unsupported heavy nodes, the activation tensors the
    quantizer needs ranges for (each with the searched ops that read it), and the follower nodes
    (see FOLLOWERS) that can run INT8, when every activation they read is INT8."""
    graph = model.graph
    initializers = {i.name for i in graph.initializer}
    float_types = {vi.name for vi in [*graph.value_info, *graph.input, *graph.output]
                   if vi.type.tensor_type.elem_type == TensorProto.FLOAT}
    used = {n.name for n in graph.node if n.name}
    ops, unsupported, followers = [], [], []
    tensors: dict[str, list[str]] = {}
    int8 = set()  # tensors an INT8 kernel produces: Conv/Gemm outputs, then followers' (nodes are in topological order)
    for index, node in enumerate(graph.node):
        if not node.name:  # the quantizer and the space address nodes by name
            name = f"{node.op_type}_{index}"
            while name in used:
                name += "_"
            node.name = name
            used.add(name)
        if node.op_type in FOLLOWERS:
            acts = [t for t in node.input if t in float_types and t not in initializers]  # not shapes or pads
            if acts and all(t in int8 for t in acts) and all(t in float_types for t in node.output):
                followers.append(_Follower(node.name, tuple(acts), tuple(node.output)))
                int8.update(node.output)
                for t in [*acts, *node.output]:
                    tensors.setdefault(t, [])
            continue
        if node.op_type not in ("MatMul", "Gemm", "Conv"):
            continue
        weights = [i for i in node.input[1:2] if i in initializers]
        approaches = ("static", "dynamic") if node.op_type == "MatMul" else ("static",)
        if node.op_type == "MatMul":
            acts = [i for i in node.input if i not in initializers]
            if not acts:  # e.g. DeBERTa's projection of its relative-position embeddings
                unsupported.append(UnsupportedOp(node.name, node.op_type,
                                                 "both inputs are constant initializers: it computes a constant, "
                                                 "which ONNX Runtime's constant folding removes; nothing to quantize"))
                continue
            op_type = "MatMul" if weights else ACT_X_ACT
        elif not weights:
            unsupported.append(UnsupportedOp(node.name, node.op_type,
                                             "its weight is not a constant initializer; runs FP32"))
            continue
        else:
            acts, op_type = [node.input[0]], node.op_type
        # QLinearConv / QGemm also quantize their output (MatMul's stays float: MatMulIntegerToFloat).
        outputs = [node.output[0]] if node.op_type != "MatMul" else []
        missing = [t for t in acts + outputs if t not in float_types and t not in initializers]
        if missing:
            unsupported.append(UnsupportedOp(node.name, node.op_type,
                                             f"tensor '{missing[0]}' is not known to be float32; runs FP32"))
            continue
        ops.append(OpInfo(node.name, op_type, approaches))
        for t in acts:
            tensors.setdefault(t, []).append(node.name)  # the ops reading t: whose calibration override applies
        for t in outputs:
            tensors.setdefault(t, [])
        int8.update(outputs)
        followers.append(_Follower(node.name, (), tuple(outputs)))  # a searched op: INT8 unless FP32
    return ops, unsupported, tensors, followers


def _as_array(value: Any, name: str, type_text: str, shape: list, index: int) -> np.ndarray:
    """One input of a calibration batch as the numpy array ORT expects, or a clear error."""
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().numpy()
    array = np.asarray(value)
    dtype = _ORT_TYPES.get(type_text)
    if dtype is not None and array.dtype != dtype:
        if not np.can_cast(array.dtype, dtype, casting="same_kind"):
            raise CalibrationDataError(
                f"Calibration batch {index}: input '{name}' has dtype {array.dtype}, "
                f"the model expects {np.dtype(dtype)}."
            )
        array = array.astype(dtype)
    if len(shape) != array.ndim:
        raise CalibrationDataError(
            f"Calibration batch {index}: input '{name}' has shape {list(array.shape)} but the model expects "
            f"rank {len(shape)} ({shape})."
        )
    for axis, (want, got) in enumerate(zip(shape, array.shape, strict=False)):
        if isinstance(want, int) and want != got:
            raise CalibrationDataError(
                f"Calibration batch {index}: input '{name}' has size {got} on axis {axis}, the model expects {want} "
                f"(shape {shape})."
            )
    return array


_ORT_TYPES = {
    "tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8, "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}
