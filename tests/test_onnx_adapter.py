"""The ONNX Runtime adapter beyond the shared contract (tests/test_adapter_contract.py), on the small
model of tests/adapter_cases.py, with real ORT sessions and real quantizers: no mocks."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper
from onnxruntime.quantization.onnx_quantizer import ONNXQuantizer

import autoquant
from autoquant.adapters import adapter_for
from autoquant.adapters.onnx import ONNXAdapter, ORTSession
from autoquant.errors import BackendError, CalibrationDataError
from autoquant.space import QuantConfig
from tests.adapter_cases import D, tiny_model
from tests.adapter_cases import onnx_batches as batches


@pytest.fixture(scope="module")
def adapter() -> ONNXAdapter:
    a = ONNXAdapter(tiny_model(), batches())
    a.calibrate()
    return a


def _graph(adapter: ONNXAdapter, config: QuantConfig) -> onnx.GraphProto:
    return adapter.build(adapter.space.resolve(config)).model_proto.graph


def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in graph.node for out in node.output}


def _init(graph: onnx.GraphProto, name: str) -> np.ndarray:
    return next(numpy_helper.to_array(i) for i in graph.initializer if i.name == name)


def _input_dq(graph: onnx.GraphProto, node_name: str, index: int) -> onnx.NodeProto:
    """The DequantizeLinear feeding input ``index`` of node ``node_name``."""
    node = next(n for n in graph.node if n.name == node_name)
    producer = _producers(graph)[node.input[index]]
    assert producer.op_type == "DequantizeLinear", f"input {index} of {node_name} is not quantized"
    return producer


def test_space_lists_each_kind_of_op(adapter: ONNXAdapter) -> None:
    kinds = {op.name: op.op_type for op in adapter.space.ops}
    assert kinds == {"m1": "MatMul", "m2": "MatMul", "scores": "MatMul(act x act)", "mix": "MatMul(act x act)",
                     "conv": "Conv", "gemm": "Gemm"}
    assert adapter.space.approaches == ("static", "dynamic")
    # Dynamic covers the weight MatMuls; its act x act MatMuls are static QDQ (no dynamic kernel).
    assert {op.name for op in adapter.space.ops if "dynamic" in op.approaches} == {"m1", "m2", "scores", "mix"}


def test_matmul_only_models_prefer_dynamic() -> None:
    model = tiny_model()
    keep = [n for n in model.graph.node if n.name not in ("t2", "conv", "pool", "gemm")]
    del model.graph.node[:]
    model.graph.node.extend(keep)
    del model.graph.output[1]
    a = ONNXAdapter(model, batches(2))
    assert a.space.approaches == ("dynamic", "static")
    assert a.space.default_config().approach == "dynamic"


def test_candidates_run_in_ort_and_stay_close(adapter: ONNXAdapter) -> None:
    session = adapter.build(adapter.space.resolve(adapter.space.default_config()))
    assert isinstance(session, ort.InferenceSession)
    y8, y32 = adapter.runner(session)()[0], adapter.runner(adapter.fp32_model)()[0]
    assert y8.shape == y32.shape
    assert np.abs(y8 - y32).max() < 0.1 * np.abs(y32).max()


def test_quantized_weights_are_reused_between_builds_and_equal_fresh_ones() -> None:
    reused = ONNXAdapter(tiny_model(), batches())
    first = _graph(reused, QuantConfig())
    cached = len(reused._quantized_weights)
    again = _graph(reused, QuantConfig(fp32_ops=frozenset({reused.space.ops[0].name})))
    assert cached > 0 and len(reused._quantized_weights) == cached  # the second build quantized no weight anew
    fresh = _graph(ONNXAdapter(tiny_model(), batches()), QuantConfig(fp32_ops=frozenset({reused.space.ops[0].name})))
    weights = {i.name: numpy_helper.to_array(i) for i in again.initializer if i.name.endswith("_quantized")}
    assert weights and all(np.array_equal(weights[i.name], numpy_helper.to_array(i))
                           for i in fresh.initializer if i.name in weights)
    assert {i.name for i in first.initializer} >= set(weights)


def test_indexed_graph_edits_write_the_model_ort_s_own_scans_write(adapter: ONNXAdapter, monkeypatch) -> None:
    """The build finds a tensor's consumers through an index (ORT scans every node per tensor): the
    quantized graph must be ORT's, byte for byte, with multi-consumer tensors (x, b) and fallbacks."""
    from onnxruntime.quantization.onnx_model import ONNXModel

    from autoquant.adapters import onnx as onnx_adapter

    configs = [QuantConfig(), QuantConfig(fp32_ops=frozenset({"m2"})), QuantConfig(fp32_ops=frozenset({"m1", "conv"}))]
    indexed = [adapter.build(adapter.space.resolve(c)).model_proto.SerializeToString() for c in configs]

    class Scan:  # ORT's own edits: every node, each time
        def __init__(self, graph: onnx.GraphProto) -> None:
            self.graph = graph

        def replace(self, old: str, new: str) -> None:
            for node in self.graph.node:
                ONNXModel.replace_node_input(node, old, new)

    monkeypatch.setattr(onnx_adapter, "_ConsumerIndex", Scan)
    monkeypatch.setattr(onnx_adapter, "_append_initializers", ONNXModel.initializer_extend)
    scanned = [adapter.build(adapter.space.resolve(c)).model_proto.SerializeToString() for c in configs]
    assert indexed == scanned and len(set(indexed)) == 3


def test_scheme_changes_activation_zero_point(adapter: ONNXAdapter) -> None:
    zero_points = {}
    for scheme in ("asymmetric", "symmetric"):
        graph = _graph(adapter, QuantConfig(scheme=scheme))
        dq = _input_dq(graph, "m1", 0)
        assert _init(graph, dq.input[2]).dtype == np.uint8  # uint8 activations: the fast path
        zero_points[scheme] = int(_init(graph, dq.input[2]))
    assert zero_points["symmetric"] == 128
    assert zero_points["asymmetric"] != 128


def test_dynamic_approach_writes_integer_ops(adapter: ONNXAdapter) -> None:
    static = {n.op_type for n in _graph(adapter, QuantConfig()).node}
    dynamic = {n.op_type for n in _graph(adapter, QuantConfig("dynamic", None, "per_channel", None)).node}
    assert "QuantizeLinear" in static and "DynamicQuantizeLinear" not in static
    assert "DynamicQuantizeLinear" in dynamic and "MatMulInteger" in dynamic
    graph = _graph(adapter, QuantConfig("dynamic", None, "per_channel", None))
    assert _input_dq(graph, "scores", 0) is not None and _input_dq(graph, "mix", 1) is not None
    fp32 = _graph(adapter, QuantConfig("dynamic", None, "per_channel", None, fp32_ops=frozenset({"scores", "mix"})))
    assert "QuantizeLinear" not in {n.op_type for n in fp32.node}


def test_op_calibration_changes_only_that_ops_input_scale(adapter: ONNXAdapter) -> None:
    def scales(config: QuantConfig) -> dict[str, float]:
        graph = _graph(adapter, config)
        return {op: float(_init(graph, _input_dq(graph, op, 0).input[1])) for op in ("m1", "m2", "scores", "conv")}

    base = scales(QuantConfig())
    override = scales(QuantConfig(op_calibration={"m2": "percentile-99"}))
    assert override["m2"] < base["m2"]  # the percentile clips
    assert {k: v for k, v in override.items() if k != "m2"} == {k: v for k, v in base.items() if k != "m2"}


def test_statistics_survive_variable_lengths_and_minus_inf(caplog: pytest.LogCaptureFixture) -> None:
    data = batches(3)
    data[1]["x"][0, 0, :3] = -np.inf  # like an attention mask
    a = ONNXAdapter(tiny_model(), data)
    with caplog.at_level(logging.WARNING, logger="autoquant"):
        a.calibrate()
    assert a._stats["x"].nonfinite == 3
    assert np.isfinite(a._stats["x"].min) and a._stats["x"].count == sum(b["x"].size for b in data) - 3
    assert "non-finite" in caplog.text and "'x': 3" in caplog.text
    session = a.build(a.space.resolve(QuantConfig(calibration="entropy")))
    assert np.isfinite(session.run(None, batches(1, seed=5)[0])[0]).all()


def test_build_silences_only_the_quantizers_info_lines(adapter: ONNXAdapter, caplog, monkeypatch) -> None:
    original = ONNXQuantizer.quantize_model

    def quantize_and_log(self: ONNXQuantizer) -> onnx.ModelProto:
        logging.getLogger("caller").info("the caller's line")  # another thread logging during a build
        return original(self)

    monkeypatch.setattr(ONNXQuantizer, "quantize_model", quantize_and_log)
    with caplog.at_level(logging.INFO):  # a dynamic build: ORT logs "parameters not specified" per tensor
        adapter.build(QuantConfig("dynamic", None, "per_channel", None))
    assert "the caller's line" in caplog.text  # logging.disable used to drop it
    assert not [r for r in caplog.records if "onnxruntime" in r.pathname and r.levelno <= logging.INFO]
    assert logging.root.manager.disable == logging.NOTSET and not logging.root.filters


def test_adapter_for_picks_onnx(tmp_path) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(tiny_model(), str(path))
    assert adapter_for(tiny_model()) is ONNXAdapter and adapter_for(path) is ONNXAdapter
    ONNXAdapter(str(path), batches(1))  # a path loads too


# --- errors ------------------------------------------------------------------------------------------------
def test_a_file_that_is_not_onnx(tmp_path) -> None:
    path = tmp_path / "bad.onnx"
    path.write_bytes(b"definitely not a protobuf \xff\xfe")
    with pytest.raises(BackendError, match="is not an ONNX model"):
        ONNXAdapter(path, batches(1))


def test_a_model_failing_the_checker() -> None:
    model = tiny_model()
    model.graph.node[1].input[0] = "nowhere"
    with pytest.raises(BackendError, match="onnx.checker"):
        ONNXAdapter(model, batches(1))


def test_an_unsupported_opset() -> None:
    model = tiny_model()
    model.opset_import[0].version = 9
    with pytest.raises(BackendError, match="opset 9"):
        ONNXAdapter(model, batches(1))


def test_an_op_onnx_runtime_cannot_run() -> None:
    model = tiny_model()
    model.graph.node.append(helper.make_node("Frobnicate", ["g"], ["g2"], name="frob", domain="example.custom"))
    model.opset_import.append(helper.make_opsetid("example.custom", 1))
    with pytest.raises(BackendError, match="Frobnicate"):
        ONNXAdapter(model, batches(1))


def test_calibration_batches_that_do_not_match_the_inputs() -> None:
    with pytest.raises(CalibrationDataError, match="input 'xx'.*Did you mean 'x'"):
        ONNXAdapter(tiny_model(), [{"xx": np.zeros((1, 4, D), np.float32)}])
    with pytest.raises(CalibrationDataError, match="'x' has shape \\[4, 8\\].*rank 3"):
        ONNXAdapter(tiny_model(), [np.zeros((4, D), np.float32)])
    with pytest.raises(CalibrationDataError, match="'x' has size 5 on axis 2"):
        ONNXAdapter(tiny_model(), [(np.zeros((1, 4, 5), np.float32),)])
    later = batches(2) + [{"x": np.zeros((1, 4, 5), np.float32)}]
    with pytest.raises(CalibrationDataError, match="batch 2: input 'x'"):
        ONNXAdapter(tiny_model(), later).calibrate()


# --- the whole loop ------------------------------------------------------------------------------------------
def test_tune_meets_a_loose_criterion_and_saves_a_model_ort_loads(tmp_path) -> None:
    data = batches()
    reference = ORTSession(tiny_model())
    evaluation = batches(4, seed=7)
    expected = [reference.run(None, feeds) for feeds in evaluation]

    def eval_fn(session: ort.InferenceSession) -> float:
        """Mean cosine similarity of all outputs with FP32's (1.0 for the FP32 model)."""
        sims = []
        for feeds, want in zip(evaluation, expected, strict=False):
            for got, ref in zip(session.run(None, feeds), want, strict=False):
                sims.append(float(np.sum(got * ref) / (np.linalg.norm(got) * np.linalg.norm(ref))))
        return float(np.mean(sims))

    result = autoquant.Tuner(autoquant.AccuracyCriterion(relative=0.02), strategy="random", max_trials=8).tune(
        tiny_model(), data, eval_fn)
    assert result.met and result.accuracy > 0.98
    assert isinstance(result.model, onnx.ModelProto)
    # A dynamic candidate's act x act MatMuls are static QDQ: its weight MatMuls may all be FP32.
    kernels = {"static": {"QuantizeLinear"}, "dynamic": {"DynamicQuantizeLinear", "QuantizeLinear"}}
    if len(result.fp32_ops) < result.quantizable_ops:  # random search may end on an all-FP32 candidate
        assert any(n.op_type in kernels[result.config.approach] for n in result.model.graph.node)  # the config's
    result.save(tmp_path)
    loaded = autoquant.load(tmp_path)
    assert isinstance(loaded, onnx.ModelProto)
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    assert eval_fn(session) == pytest.approx(result.accuracy, abs=1e-6)


def test_sessions_do_not_spin_after_a_run(adapter):
    # a spinning session takes the cores from the next one: interleaved latency pairs went bimodal
    session = adapter.build(adapter.space.resolve(adapter.space.default_config()))
    for s in (session, adapter.fp32_model):
        assert s.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"
