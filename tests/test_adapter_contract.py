"""The contract every adapter keeps, run for each case of tests/adapter_cases.py (FX, ONNX, the
fake) on the real backends. Modelled on Optuna's shared storage suite: one parametrised test per
rule; where an adapter differs, it skips with the reason its case writes down."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from autoquant.errors import CalibrationDataError, ConfigError
from autoquant.space import APPROACHES, GRANULARITIES, KNOBS, SCHEMES, QuantConfig
from tests.adapter_cases import CASES, Case, Counting


@pytest.fixture(params=sorted(CASES), scope="module")
def case(request: pytest.FixtureRequest) -> Case:
    return CASES[request.param]


@pytest.fixture(scope="module")
def adapter(case: Case):  # calibrated once per case; tests that count or change it make their own
    adapter = case.adapter(case.model(), case.batches())
    adapter.calibrate()
    return adapter


def need(case: Case, capability: str) -> None:
    if capability in case.lacks:
        pytest.skip(case.lacks[capability])


def assert_same_outputs(case: Case, a: object, b: object, atol: float = 1e-6) -> None:
    batch = case.batches()[1]
    for x, y in zip(case.outputs(a, batch), case.outputs(b, batch), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=atol)


def test_empty_calibration_data_is_refused(case: Case) -> None:
    with pytest.raises(CalibrationDataError, match="yielded no batch"):
        case.adapter(case.model(), []).calibrate()


def test_a_batch_the_model_cannot_run_is_named(case: Case) -> None:
    need(case, "batches")
    data = case.batches()
    with pytest.raises(CalibrationDataError, match=f"(?i)calibration batch {len(data)}"):
        case.adapter(case.model(), [*data, case.bad_batch]).calibrate()


def test_calibration_data_is_read_once(case: Case) -> None:
    data = Counting(case.batches())
    adapter = case.adapter(case.model(), data)
    before = data.yielded  # construction may look at the first batch
    adapter.calibrate()
    for config in (adapter.space.default_config(), QuantConfig(fp32_ops=frozenset(adapter.space.op_names[:1]))):
        adapter.build(config)
    adapter.calibrate()
    assert data.yielded - before == len(data.batches)


def test_build_never_alters_the_fp32_model(case: Case) -> None:
    model = case.model()
    before = case.snapshot(model)
    adapter = case.adapter(model, case.batches())
    reference = case.outputs(adapter.fp32_model, case.batches()[1])
    for config in adapter.space.knob_configs()[:3] + [QuantConfig(fp32_ops=frozenset(adapter.space.op_names))]:
        adapter.build(adapter.space.resolve(config))
    assert case.snapshot(model) == before
    for x, y in zip(case.outputs(adapter.fp32_model, case.batches()[1]), reference, strict=True):
        np.testing.assert_array_equal(x, y)


def test_all_fp32_candidate_equals_fp32(case: Case, adapter) -> None:
    built = adapter.build(QuantConfig(fp32_ops=frozenset(adapter.space.op_names)))
    assert not any(case.is_int8(built, op) for op in adapter.space.op_names)
    assert_same_outputs(case, built, adapter.fp32_model)


def test_every_single_op_fallback_builds_and_runs(case: Case, adapter) -> None:
    everything = adapter.build(adapter.space.default_config())
    assert all(case.is_int8(everything, op) for op in adapter.space.op_names)
    for op in adapter.space.op_names:
        built = adapter.build(QuantConfig(fp32_ops=frozenset({op})))
        assert [o for o in adapter.space.op_names if not case.is_int8(built, o)] == [op]
        assert all(np.isfinite(y).all() for y in case.outputs(built, case.batches()[1]))


def test_save_load_triangle(case: Case, adapter, tmp_path) -> None:
    built = adapter.build(adapter.space.default_config())
    path = adapter.save_model(adapter.result_model(built), tmp_path)
    assert_same_outputs(case, type(adapter).load_model(path), built, atol=0)


def test_statistics_cache_round_trip(case: Case, adapter, tmp_path) -> None:
    need(case, "stats")
    assert adapter.save_stats(tmp_path / "stats.json")
    data = Counting(case.batches())
    restored = case.adapter(case.model(), data)
    before = data.yielded
    assert restored.load_stats(tmp_path / "stats.json")
    config = QuantConfig(calibration="entropy")
    assert_same_outputs(case, restored.build(config), adapter.build(config), atol=0)
    assert data.yielded == before  # the cache made calibration unnecessary


def test_another_models_statistics_cache_is_refused(case: Case, adapter, tmp_path) -> None:
    need(case, "stats")
    adapter.save_stats(tmp_path / "stats.json")
    other = case.adapter(*case.other_model())
    with pytest.raises(ConfigError, match="holds statistics for other tensors"):
        other.load_stats(tmp_path / "stats.json")


def test_unknown_op_name_is_refused(case: Case, adapter) -> None:
    typo = case.input_op + "x"
    with pytest.raises(ConfigError, match=f"Unknown op '{typo}'.*Did you mean '{case.input_op}'"):
        adapter.build(QuantConfig(fp32_ops=frozenset({typo})))
    with pytest.raises(ConfigError, match=f"Unknown op '{typo}'"):
        adapter.build(QuantConfig(op_calibration={typo: "entropy"}))


def test_space_lists_ops_and_unsupported_with_reasons(case: Case, adapter) -> None:
    assert adapter.space.op_names == case.ops
    assert all(op.op_type and op.approaches for op in adapter.space.ops)
    assert tuple(u.name for u in adapter.space.unsupported) == case.unsupported
    assert all("FP32" in u.reason for u in adapter.space.unsupported)


def test_config_outside_the_space_is_refused(case: Case, adapter) -> None:
    default = adapter.space.default_config()
    outside = [replace(default, calibration="minmx")]  # not a registered method
    every = {"approach": APPROACHES, "granularity": GRANULARITIES, "scheme": SCHEMES}
    outside += [replace(default, **{knob: value}) for knob in KNOBS
                for value in every.get(knob, ()) if value not in adapter.space.choices(knob)]
    for config in outside:
        with pytest.raises(ConfigError, match="Unknown"):
            adapter.build(config)


def test_calibration_method_changes_the_input_scale(case: Case, adapter) -> None:
    need(case, "stats")
    scale = {m: case.input_scale(adapter.build(QuantConfig(calibration=m)), case.input_op)
             for m in ("minmax", "entropy")}
    assert scale["entropy"] < scale["minmax"] / 3  # the outlier is clipped
    override = adapter.build(QuantConfig(calibration="minmax", op_calibration={case.input_op: "entropy"}))
    assert case.input_scale(override, case.input_op) == scale["entropy"]


def test_granularity_changes_the_weight_scale_count(case: Case, adapter) -> None:
    need(case, "weights")
    count = {g: case.weight_scales(adapter.build(QuantConfig(granularity=g)), case.weight_op)
             for g in ("per_channel", "per_tensor")}
    assert count == {"per_channel": case.channels, "per_tensor": 1}
