"""The ONNX Runtime adapter on a small ONNX model built here (MatMul, act x act MatMul, Conv, Gemm),
with real ORT sessions and real quantizers: no mocks."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import autoquant
from autoquant.adapters import adapter_for
from autoquant.adapters.onnx import ONNXAdapter, ORTSession
from autoquant.errors import BackendError, CalibrationDataError
from autoquant.space import QuantConfig

D, H, K = 8, 16, 4


def tiny_model(opset: int = 17) -> onnx.ModelProto:
    """x [N, S, 8] -> MatMul -> Relu -> MatMul -> (b @ b^T) @ b ; x^T -> Conv1d -> mean -> Gemm."""
    rng = np.random.default_rng(0)
    w = lambda name, *shape: numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32) * 0.5, name)  # noqa: E731
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["a"], name="m1"),
        helper.make_node("Relu", ["a"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "W2"], ["b"], name="m2"),
        helper.make_node("Transpose", ["b"], ["bt"], name="t1", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["b", "bt"], ["s"], name="scores"),
        helper.make_node("MatMul", ["s", "b"], ["y"], name="mix"),
        helper.make_node("Transpose", ["x"], ["xt"], name="t2", perm=[0, 2, 1]),
        helper.make_node("Conv", ["xt", "WC", "BC"], ["c"], name="conv", pads=[1, 1], kernel_shape=[3]),
        helper.make_node("ReduceMean", ["c"], ["p"], name="pool", axes=[2], keepdims=0),
        helper.make_node("Gemm", ["p", "WG", "BG"], ["g"], name="gemm"),
    ]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "S", D])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "S", D]),
         helper.make_tensor_value_info("g", TensorProto.FLOAT, ["N", K])],
        [w("W1", D, H), w("W2", H, D), w("WC", D, D, 3), w("BC", D), w("WG", D, K), w("BG", K)],
    )
    if opset >= 18:
        raise ValueError("ReduceMean takes axes as an input from opset 18")
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def batches(n: int = 6, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((2, 5 + 3 * i, D)).astype(np.float32)} for i in range(n)]  # lengths vary


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


def _input_dq(graph: onnx.GraphProto, node_name: str, index: int) -> onnx.NodeProto | None:
    """The DequantizeLinear feeding input ``index`` of node ``node_name``, if any."""
    node = next(n for n in graph.node if n.name == node_name)
    producer = _producers(graph).get(node.input[index])
    return producer if producer is not None and producer.op_type == "DequantizeLinear" else None


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


def test_fallback_removes_the_ops_quantization(adapter: ONNXAdapter) -> None:
    int8 = _graph(adapter, QuantConfig())
    fp32 = _graph(adapter, QuantConfig(fp32_ops=frozenset({"m2", "conv"})))
    assert _input_dq(int8, "m2", 0) is not None and _input_dq(int8, "conv", 0) is not None
    assert _input_dq(fp32, "m2", 0) is None and _input_dq(fp32, "conv", 0) is None
    assert _input_dq(fp32, "m1", 0) is not None  # the others stay INT8


def test_granularity_changes_weight_scales(adapter: ONNXAdapter) -> None:
    for granularity, size in (("per_channel", H), ("per_tensor", 1)):
        graph = _graph(adapter, QuantConfig(granularity=granularity))
        weight_dq = _input_dq(graph, "m1", 1)
        assert _init(graph, weight_dq.input[1]).size == size


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


def test_stats_cache_round_trip(adapter: ONNXAdapter, tmp_path) -> None:
    path = tmp_path / "stats.json"
    assert adapter.save_stats(path)
    fresh = ONNXAdapter(tiny_model(), batches())
    assert fresh.load_stats(path)
    config = QuantConfig(calibration="mse")
    a, b = _graph(adapter, config), _graph(fresh, config)
    assert _init(a, _input_dq(a, "m1", 0).input[1]) == _init(b, _input_dq(b, "m1", 0).input[1])


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
    assert any(n.op_type == "QuantizeLinear" for n in result.model.graph.node) or result.config.approach == "dynamic"
    result.save(tmp_path)
    loaded = autoquant.load(tmp_path)
    assert isinstance(loaded, onnx.ModelProto)
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    assert eval_fn(session) == pytest.approx(result.accuracy, abs=1e-6)
