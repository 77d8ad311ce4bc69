"""The sensitivity strategy: ranking on a real FX model, and its plan on the fast fake adapter."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from autoquant import AccuracyCriterion, ConfigError, QuantConfig, Tuner
from autoquant.adapters.fx import FXAdapter
from autoquant.probe import OutputProbe
from autoquant.strategies import STRATEGIES, get_strategy
from autoquant.strategies.sensitivity import SensitivityStrategy
from tests.fake_adapter import FakeAdapter, FakeModel, fake_model


def tune(model, eval_fn=None, *, adapter=FakeAdapter, **kwargs):
    kwargs.setdefault("criterion", AccuracyCriterion(relative=0.01))
    kwargs.setdefault("latency_budget_s", 0.001)
    kwargs.setdefault("max_trials", 30)
    return Tuner(strategy="sensitivity", **kwargs).tune(
        model, [None], eval_fn or (lambda m: m.accuracy()), adapter=adapter)


def fp32_sequence(result):
    return result.history["fp32_ops"].tolist()


# --- the real backend: a model with one fragile layer -----------------------------------------
class OutlierNet(nn.Module):
    scale: torch.Tensor  # a buffer
    """Four Linears; the input of ``fc2`` has one channel 1000x larger than the rest, made by an
    elementwise scale that is not searched (a method call). FP32 is unchanged (fc2 divides it back),
    but an INT8 range stretched by the outlier crushes fc2's other input channels."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc0, self.fc1 = nn.Linear(16, 32), nn.Linear(32, 32)
        self.fc2, self.fc3 = nn.Linear(32, 32), nn.Linear(32, 10)
        scale = torch.ones(32)
        scale[3] = 1000.0
        self.register_buffer("scale", scale)
        with torch.no_grad():
            self.fc2.weight[:, 3] /= 1000.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.fc0(x))
        x = torch.relu(self.fc1(x)).mul(self.scale)
        return self.fc3(torch.relu(self.fc2(x)))


@pytest.fixture(scope="module")
def outlier():
    model = OutlierNet().eval()
    generator = torch.Generator().manual_seed(1)
    calibration = [torch.randn(64, 16, generator=generator) for _ in range(4)]
    held_out = torch.randn(256, 16, generator=generator)
    with torch.inference_mode():
        reference = model(held_out)

    def fidelity(candidate):  # 1 - relative output error on held-out inputs (higher is better)
        with torch.inference_mode():
            error = ((candidate(held_out) - reference) ** 2).sum() / (reference**2).sum()
        return 1.0 - float(error)

    return model, calibration, fidelity


@pytest.mark.parametrize("measure", ["int8", "fp32"])
def test_ranks_the_fragile_layer_first_on_a_real_model(outlier, measure):
    model, calibration, _ = outlier
    adapter = FXAdapter(model, calibration)
    adapter.calibrate()
    strategy = SensitivityStrategy(measure=measure)
    strategy.setup(adapter.space, OutputProbe(adapter, adapter.space))
    ranking = strategy.rank()
    assert [r.op for r in ranking][0] == "fc2"
    assert sorted(r.op for r in ranking) == ["fc0", "fc1", "fc2", "fc3"]
    assert ranking[0].score > 2 * ranking[1].score  # clearly first, not by a hair
    table = strategy.sensitivity
    assert list(table["op"]) == [r.op for r in ranking] and list(table["rank"]) == [1, 2, 3, 4]
    # determinism: the probe is deterministic, so ranking again gives the same numbers
    again = SensitivityStrategy(measure=measure)
    again.setup(adapter.space, OutputProbe(adapter, adapter.space))
    assert again.rank() == ranking


def test_real_tune_reports_the_ranking_and_an_editable_config(outlier, tmp_path):
    model, calibration, fidelity = outlier
    result = Tuner(AccuracyCriterion(relative=0.001), max_trials=12).tune(model, calibration, fidelity)
    assert Tuner().strategy.name == "sensitivity"  # the default
    assert result.met and result.sensitivity is not None
    assert result.sensitivity["op"].iloc[0] == "fc2"
    assert result.trials <= 4  # default, probe's knobs (+ per-op calibration), then fc2 alone in FP32
    assert len(result.fp32_ops) < result.quantizable_ops

    result.save(tmp_path)
    assert (tmp_path / "sensitivity.csv").read_text().startswith("rank,op,op_type,sensitivity")
    assert (tmp_path / "sensitivity.png").read_bytes()[:4] == b"\x89PNG"
    # the saved config is what a user edits and re-runs: it rebuilds the same model
    config = QuantConfig.from_dict(json.loads((tmp_path / "result.json").read_text())["config"])
    adapter = FXAdapter(model, calibration)
    rebuilt = adapter.build(adapter.space.resolve(adapter.space.validate(config)))
    assert fidelity(rebuilt) == pytest.approx(result.accuracy)
    edited = QuantConfig.from_dict({**config.to_dict(), "fp32_ops": []})  # e.g. the user re-quantizes all
    assert fidelity(adapter.build(adapter.space.resolve(adapter.space.validate(edited)))) < result.accuracy


# --- the plan, on the fake adapter ---------------------------------------------------------------
def test_registered_and_checks_its_options():
    assert STRATEGIES["sensitivity"] is SensitivityStrategy
    assert isinstance(get_strategy("sensitivity", seed=0), SensitivityStrategy)
    with pytest.raises(ConfigError, match="Did you mean 'int8'"):
        SensitivityStrategy(measure="int")
    with pytest.raises(ConfigError, match="Did you mean 'latency'"):
        Tuner(objective="latancy")


def test_stops_at_the_first_passing_candidate():
    result = tune(fake_model(n_ops=6, sensitive={2: 0.05}))
    assert result.met and result.fp32_ops == ["op2"]
    assert fp32_sequence(result) == ["", "op2"]  # default fails, then the top-ranked op alone
    assert result.history["passed"].tolist() == [False, True]
    assert result.sensitivity["op"].iloc[0] == "op2"


def test_no_ranking_when_the_default_passes():
    result = tune(fake_model(n_ops=4))
    assert result.trials == 1 and result.sensitivity is None  # the probe was never needed


def test_falls_back_the_ranked_prefix_in_growing_groups():
    model = fake_model(n_ops=8, sensitive={1: 0.02, 4: 0.03, 6: 0.04})  # all three must fall back
    result = tune(model)
    assert result.met
    assert fp32_sequence(result) == ["", "op6", "op4 op6", "op0 op1 op4 op6"]  # 1, 2, then 4 ops


def test_latency_objective_binary_searches_then_stops():
    model = fake_model(n_ops=8, sensitive={1: 0.02, 4: 0.03, 6: 0.04})
    result = tune(model, objective="latency")
    sequence = fp32_sequence(result)
    # after the 4-op pass: the 3-op prefix passes; re-quantizing op4 or op6 fails; then the plan ends
    assert sequence == ["", "op6", "op4 op6", "op0 op1 op4 op6", "op1 op4 op6", "op1 op6", "op1 op4"]
    assert result.met and set(result.fp32_ops) >= {"op1", "op4", "op6"}


def harmless_op0(model):
    """eval_fn disagrees with the probe: op0 costs output error but no accuracy."""
    if model.config is not None and "op0" not in model.config.fp32_ops:
        return model.accuracy() + model.sensitivity["op0"]
    return model.accuracy()


def test_requantize_pass_undoes_a_needless_fallback():
    model = fake_model(n_ops=5, sensitive={0: 0.05, 1: 0.04})
    first = tune(model, harmless_op0)  # accuracy objective: the first pass ends the job
    assert fp32_sequence(first) == ["", "op0", "op0 op1"] and first.fp32_ops == ["op0", "op1"]
    latency = tune(model, harmless_op0, objective="latency")
    assert fp32_sequence(latency) == ["", "op0", "op0 op1", "op1"]  # op0 re-quantized
    assert latency.history["passed"].tolist() == [False, False, True, True]


class PerOpModel(FakeModel):
    """Entropy calibration rescues the ``calibration_helps`` ops and hurts every other op, so only
    a per-op override (not the global knob) helps."""

    def accuracy(self) -> float:
        if self.config is None:
            return self.baseline
        loss = 0.0
        for op, cost in self.sensitivity.items():
            if op not in self.config.fp32_ops:
                if self.config.calibration_of(op) == "entropy":
                    cost = cost / 10 if op in self.calibration_helps else cost + 0.2
                loss += cost
        return self.baseline - loss


class PerOpAdapter(FakeAdapter):
    def build(self, config):
        return PerOpModel(self.model.sensitivity, self.model.baseline, self.model.calibration_helps, config)


def test_per_op_calibration_rescues_the_top_op_without_fallback():
    result = tune(fake_model(n_ops=4, sensitive={1: 0.05}, calibration_helps=("op1",)), adapter=PerOpAdapter)
    assert result.met and result.trials == 2 and result.fp32_ops == []
    assert result.config.calibration == "minmax" and result.config.op_calibration == {"op1": "entropy"}
    assert result.sensitivity.set_index("op").loc["op1", "calibration"] == "entropy"


def test_per_op_calibration_is_tried_before_the_op_falls_back():
    seen = []

    def recording(model):
        if model.config is not None:
            seen.append(model.config)
        return model.accuracy()

    result = tune(fake_model(n_ops=4, sensitive={1: 0.5}, calibration_helps=("op1",)), recording, adapter=PerOpAdapter)
    assert result.met and result.fp32_ops == ["op1"]
    assert [(sorted(c.fp32_ops), c.op_calibration) for c in seen] == [
        ([], {}), ([], {"op1": "entropy"}), (["op1"], {}),
    ]


def test_same_seed_same_sequence_and_resume(tmp_path):
    model = fake_model(n_ops=8, sensitive={1: 0.02, 4: 0.03, 6: 0.04})
    whole = fp32_sequence(tune(model, objective="latency", seed=3))
    assert fp32_sequence(tune(model, objective="latency", seed=3)) == whole
    # stopped after 3 trials and resumed from the study: the plan continues, nothing repeats
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    tune(model, objective="latency", max_trials=3, storage=storage, study_name="job")
    resumed = tune(model, objective="latency", storage=storage, study_name="job")
    assert fp32_sequence(resumed) == whole


def test_unmeetable_goal_spends_the_budget_on_the_rest_of_the_space():
    model = fake_model(n_ops=3, sensitive={0: 0.2})
    result = tune(model, lambda m: m.accuracy() - (0.1 if m.config else 0.0), max_trials=9)
    assert not result.met and result.trials == 9 and result.evaluations == 9
    # the plan (default, then 1, 2, 3 ops by rank) first, then other knobs
    assert fp32_sequence(result)[:4] == ["", "op0", "op0 op1", "op0 op1 op2"]
    assert len(set(zip(fp32_sequence(result), result.history["calibration"], result.history["scheme"],
                       result.history["granularity"], strict=False))) == 9


def test_probe_error_tracks_the_fake_accuracy():
    adapter = FakeAdapter(fake_model(n_ops=2, sensitive={1: 0.3}), None)
    probe = OutputProbe(adapter, adapter.space)
    assert probe.error(QuantConfig(fp32_ops={"op1"})) < probe.error(QuantConfig(fp32_ops={"op0"}))
    assert np.isclose(probe.error(QuantConfig(fp32_ops={"op0", "op1"})), 0.0)
