"""SmoothQuant: the numpy math, the smooth_alpha knob, and the ONNX adapter on a small attention
block whose LayerNorm writes one outlier channel (as BERT's do)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from autoquant import AccuracyCriterion, Tuner
from autoquant.adapters.onnx import ACT_X_ACT, ONNXAdapter, ORTSession
from autoquant.adapters.onnx_smoothing import smooth
from autoquant.calibration import TensorStats, read_stats, write_stats
from autoquant.config import SpaceSpec
from autoquant.errors import ConfigError
from autoquant.smoothing import ALPHAS, fold_into_norm, fold_into_weight, smoothing_scales, weight_absmax
from autoquant.space import QuantConfig, Restriction
from autoquant.strategies.exhaustive import grid

D, OUTLIER = 16, 3


def attention_block() -> onnx.ModelProto:
    """x -> LN1 (gamma 40 on one channel) -> h; a = h Wa, b = h Wb; softmax(a b^T) a + h -> LN2 -> n Wc.
    h feeds two MatMuls and the residual Add (smoothed by a Mul); n feeds only Wc (folded into LN2)."""
    rng = np.random.default_rng(0)
    w = lambda name, *shape: numpy_helper.from_array(  # noqa: E731
        (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32), name)
    gamma = np.ones(D, np.float32)
    gamma[OUTLIER] = 40.0
    nodes = [
        helper.make_node("LayerNormalization", ["x", "g1", "b1"], ["h"], name="ln1", axis=-1),
        helper.make_node("MatMul", ["h", "Wa"], ["a"], name="ma"),
        helper.make_node("MatMul", ["h", "Wb"], ["b"], name="mb"),
        helper.make_node("Transpose", ["b"], ["bt"], name="t", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["a", "bt"], ["s"], name="scores"),
        helper.make_node("Softmax", ["s"], ["p"], name="softmax", axis=-1),
        helper.make_node("MatMul", ["p", "a"], ["m"], name="mix"),
        helper.make_node("Add", ["m", "h"], ["r"], name="residual"),
        helper.make_node("LayerNormalization", ["r", "g2", "b2"], ["n"], name="ln2", axis=-1),
        helper.make_node("MatMul", ["n", "Wc"], ["y"], name="mc"),
    ]
    inits = [numpy_helper.from_array(gamma, "g1"), numpy_helper.from_array(np.zeros(D, np.float32), "b1"),
             numpy_helper.from_array(gamma * 0.5, "g2"), numpy_helper.from_array(np.full(D, 0.1, np.float32), "b2"),
             w("Wa", D, D), w("Wb", D, D), w("Wc", D, D)]
    graph = helper.make_graph(nodes, "block", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "S", D])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "S", D])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def batches(n: int = 4, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((4, 12, D)).astype(np.float32)} for _ in range(n)]


@pytest.fixture(scope="module")
def adapter() -> ONNXAdapter:
    a = ONNXAdapter(attention_block(), batches())
    a.calibrate()
    return a


def _run(model: onnx.ModelProto | ORTSession, feeds: dict) -> np.ndarray:
    session = model if isinstance(model, ORTSession) else ORTSession(model)
    return session.run(None, feeds)[0]


def _dq_scale(graph: onnx.GraphProto, node: str, index: int) -> np.ndarray:
    """The scale of the DequantizeLinear feeding input ``index`` of ``node``."""
    producers = {out: n for n in graph.node for out in n.output}
    consumer = next(n for n in graph.node if n.name == node)
    dq = producers[consumer.input[index]]
    assert dq.op_type == "DequantizeLinear"
    return next(numpy_helper.to_array(i) for i in graph.initializer if i.name == dq.input[1])


# --- the math -------------------------------------------------------------------------------------
def test_scales_move_the_activation_range_into_the_weight() -> None:
    act, w = np.array([100.0, 1.0, 0.0]), np.array([1.0, 4.0, 2.0])
    s = smoothing_scales(act, w, 0.5)
    np.testing.assert_allclose(s, [10.0, 0.5, 1.0])  # sqrt(100/1), sqrt(1/4); a dead channel keeps 1
    x = np.array([[100.0, 1.0, 0.0]])
    weight = np.arange(6.0).reshape(3, 2)
    np.testing.assert_allclose((x / s) @ fold_into_weight(weight, s, in_axis=0), x @ weight)
    np.testing.assert_allclose(weight_absmax([weight, -2 * weight], in_axis=0), [2.0, 6.0, 10.0])
    np.testing.assert_allclose(weight_absmax([weight.T], in_axis=1), [1.0, 3.0, 5.0])  # torch's (out, in)
    gamma, beta = fold_into_norm(np.ones(3), np.full(3, 2.0), s)
    np.testing.assert_allclose(gamma * s, 1.0)
    np.testing.assert_allclose(beta * s, 2.0)


@pytest.mark.parametrize("alpha", [-0.1, 1.5, "0.5", True])
def test_alpha_outside_zero_one_is_refused(alpha: object) -> None:
    with pytest.raises(ConfigError, match="smooth_alpha"):
        QuantConfig(smooth_alpha=alpha)  # type: ignore[arg-type]


def test_channel_statistics_round_trip_and_old_files_are_refused(tmp_path) -> None:
    stats = TensorStats(channels=True)
    stats.update(np.array([[1.0, -5.0], [np.inf, 2.0]]))
    stats.update(np.array([[-3.0, 1.0]]))
    np.testing.assert_array_equal(stats.channel_min, [-3.0, -5.0])
    np.testing.assert_array_equal(stats.channel_absmax, [3.0, 5.0])  # inf skipped
    path = tmp_path / "stats.json"
    write_stats(path, {"t": stats, "plain": TensorStats()})
    back = read_stats(path, {"t", "plain"})
    np.testing.assert_array_equal(back["t"].channel_max, stats.channel_max)
    assert back["plain"].channel_max is None and not back["plain"].channels
    path.write_text(json.dumps({"t": stats.to_dict()}))  # the format before per-channel statistics
    with pytest.raises(ConfigError, match="another statistics format"):
        read_stats(path, {"t"})


# --- the knob ---------------------------------------------------------------------------------------
def test_the_knob_is_in_the_space_and_the_grid(adapter: ONNXAdapter) -> None:
    space = adapter.space
    assert space.smooth_alphas == ALPHAS and ALPHAS[0] is None
    static = [c for c in space.knob_configs() if c.approach == "static"]
    assert {c.smooth_alpha for c in static} == set(ALPHAS)
    assert space.default_config().smooth_alpha is None  # plain INT8 is the default
    assert {c.smooth_alpha for c in list(grid(space))[: len(space.knob_configs())]} == set(ALPHAS)
    dynamic = space.canonical(QuantConfig("dynamic", None, "per_channel", None, smooth_alpha=0.5))
    assert dynamic.smooth_alpha is None
    pinned = space.restrict(Restriction(smooth_alpha=[None, 0.8]))
    assert pinned.smooth_alphas == (None, 0.8)
    assert space.restrict(Restriction(smooth_alpha=0.5)).smooth_alphas == (0.5,)
    with pytest.raises(ConfigError, match="smooth_alpha"):
        space.restrict(Restriction(smooth_alpha=0.3))
    config = QuantConfig(smooth_alpha=0.65)
    assert config.describe().endswith("/smooth0.65")
    assert QuantConfig.from_dict(config.to_dict()) == config
    assert "smooth_alpha" not in QuantConfig().to_dict()  # keys of configs stored before the knob are unchanged


def test_yaml_field_is_validated_in_the_config() -> None:
    assert SpaceSpec(smooth_alpha=[None, 0.5]).restriction().smooth_alpha == [None, 0.5]
    with pytest.raises(ValueError, match="smooth_alpha"):
        SpaceSpec(smooth_alpha=[0.5, 2.0])


# --- the ONNX adapter ------------------------------------------------------------------------------
@pytest.mark.parametrize("alpha", [0.5, 0.8])
def test_smoothing_keeps_the_fp32_function(adapter: ONNXAdapter, alpha: float) -> None:
    smoothed, ranges = smooth(adapter._inferred, adapter._smooth_groups, adapter._stats, alpha, symmetric=False)
    feeds = batches(1, seed=7)[0]
    np.testing.assert_allclose(_run(smoothed, feeds), _run(adapter._inferred, feeds), rtol=1e-4, atol=1e-4)
    kinds = [n.op_type for n in smoothed.graph.node]
    assert kinds.count("Mul") == 1  # h also feeds the residual: divided by a Mul before Wa and Wb
    assert set(ranges) == {"h_smoothed", "n"}  # n is folded into LN2's gamma and beta
    ln2 = next(n for n in smoothed.graph.node if n.name == "ln2")
    assert ln2.input[1] != "g2"


def test_alpha_changes_the_written_scales(adapter: ONNXAdapter) -> None:
    graphs = {a: adapter.build(adapter.space.resolve(QuantConfig(smooth_alpha=a))).model_proto.graph
              for a in (None, 0.5, 0.8)}
    act = {a: float(_dq_scale(g, "ma", 0)) for a, g in graphs.items()}
    weight = {a: _dq_scale(g, "ma", 1) for a, g in graphs.items()}
    assert act[None] > act[0.5] > act[0.8]  # the outlier channel's range moves into the weight
    assert not np.allclose(weight[0.5], weight[0.8])
    assert not np.allclose(_dq_scale(graphs[0.5], "mc", 0), _dq_scale(graphs[None], "mc", 0))


def test_smoothing_cuts_the_static_int8_error_on_the_outlier_channel(adapter: ONNXAdapter) -> None:
    feeds = batches(1, seed=9)[0]
    y = _run(adapter.fp32_model, feeds)
    error = {}
    for alpha in (None, 0.5):
        config = adapter.space.resolve(QuantConfig(granularity="per_channel", smooth_alpha=alpha))
        error[alpha] = float(np.abs(_run(adapter.build(config), feeds) - y).mean())
    assert error[0.5] < 0.7 * error[None], error


def test_static_int8_attention_ops_are_searched_and_run(adapter: ONNXAdapter) -> None:
    kinds = {op.name: op.op_type for op in adapter.space.ops}
    assert kinds["scores"] == kinds["mix"] == ACT_X_ACT
    assert "static" in adapter.space.approaches
    config = adapter.space.resolve(QuantConfig(smooth_alpha=0.5))
    assert not {"scores", "mix"} & config.fp32_ops
    session = adapter.build(config)
    graph = session.model_proto.graph
    for node in ("scores", "mix"):
        _dq_scale(graph, node, 0), _dq_scale(graph, node, 1)  # both inputs INT8
    feeds = batches(1, seed=3)[0]
    y = _run(adapter.fp32_model, feeds)
    assert np.abs(_run(session, feeds) - y).max() < 0.15 * np.abs(y).max()


@pytest.mark.parametrize("strategy", ["sensitivity", "exhaustive"])
def test_strategies_find_smoothing_when_plain_static_int8_misses(strategy: str) -> None:
    feeds = batches(1, seed=9)[0]
    y = _run(ORTSession(attention_block()), feeds)

    def eval_fn(session: ORTSession) -> float:  # minus the mean output error against FP32
        return -float(np.abs(session.run(None, feeds)[0] - y).mean())

    restrict = Restriction(approach="static", calibration="minmax", granularity="per_channel", scheme="asymmetric")
    result = Tuner(AccuracyCriterion(absolute=0.15), strategy=strategy, max_trials=4, seed=0,
                   restrict=restrict).tune(attention_block(), batches(), eval_fn)
    history = result.history
    assert not history.iloc[0]["passed"]  # plain static INT8 (the default) misses: the outlier channel
    # The first pass smooths with every op INT8. Which pass the search keeps is a matter of latency:
    # on this tiny block a few microseconds of Q/DQ decide it, and may differ by machine.
    first_pass = history[history["passed"] == True].iloc[0]  # noqa: E712 (a pandas mask)
    assert result.met and first_pass["smooth_alpha"] is not None and first_pass["n_fp32"] == 0, history
