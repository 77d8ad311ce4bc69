"""CONTRIBUTING.md's recipes, done the way they are written: a toy strategy and a toy calibration method."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import optuna
import pytest
import torch

from autoquant import ConfigError, QuantConfig, Restriction, Space
from autoquant.adapters.fx import FXAdapter
from autoquant.calibration import METHODS, SEARCHED, CalibrationMethod, TensorStats, compute_range
from autoquant.config import StrategySpec
from autoquant.space import CALIBRATIONS
from autoquant.strategies import STRATEGIES, SearchExhausted, Strategy
from autoquant.strategies.base import tried_keys
from tests import test_strategies as suite
from tests.jobs import tiny_job


# --- recipe 1: a strategy -----------------------------------------------------------------------
class GrowingFallbackStrategy(Strategy):
    """Every knob combination all-INT8, then with the first ``step``, 2 * ``step``, ... ops in FP32."""

    name = "growing"

    def __init__(self, *, seed: int | None = None, step: int = 1) -> None:
        super().__init__(seed=seed)
        if step < 1:
            raise ConfigError(f"step must be at least 1, got {step}.")
        self.step = step

    def propose(self, space: Space, trials: Sequence[optuna.trial.FrozenTrial]) -> QuantConfig:
        tried = tried_keys(trials)
        for n in range(0, len(space.ops) + 1, self.step):
            for knobs in space.knob_configs():
                first = [op.name for op in space.tunable_ops(knobs.approach)][:n]
                config = space.canonical(replace(knobs, fp32_ops=frozenset(first)))
                if config.key() not in tried:
                    return config
        raise SearchExhausted("every prefix of the ops was tried in FP32")


@pytest.fixture
def growing(monkeypatch):
    monkeypatch.setitem(STRATEGIES, GrowingFallbackStrategy.name, GrowingFallbackStrategy)  # step 2: register
    return GrowingFallbackStrategy.name


def test_a_new_strategy_passes_the_shared_strategy_suite(growing, caplog):
    # step 3: the tests every strategy runs (tests/test_strategies.py, parametrised over STRATEGIES)
    suite.test_stops_at_the_first_trial_when_the_default_passes(growing)
    suite.test_finds_the_fallback_of_a_sensitive_op_and_stops(growing)
    suite.test_unmet_goal_returns_the_best_candidate(growing, caplog)


def test_a_new_strategys_options_come_from_yaml(growing):
    strategy = StrategySpec(name=growing, options={"step": 2}).strategy()
    assert isinstance(strategy, GrowingFallbackStrategy) and strategy.step == 2
    with pytest.raises(ValueError, match="Unknown option 'stepp' of strategy 'growing'. Did you mean 'step'?"):
        StrategySpec(name=growing, options={"stepp": 2})
    with pytest.raises(ValueError, match="step must be at least 1"):
        StrategySpec(name=growing, options={"step": 0})


# --- recipe 2: a calibration method ---------------------------------------------------------------
def halfmax_range(stats: TensorStats, parameter: float | None, symmetric: bool,
                  num_bits: int) -> tuple[float, float]:
    """A toy: half of the min-max range (clips the top half of every tensor)."""
    return min(stats.min, 0.0) / 2, max(stats.max, 0.0) / 2


@pytest.fixture
def halfmax(monkeypatch):
    monkeypatch.setitem(METHODS, "halfmax", halfmax_range)  # step 2: the one table of names
    return "halfmax"


def test_a_new_calibration_method_is_parsed_and_computes_its_range(halfmax):
    assert CalibrationMethod.parse(halfmax).name == halfmax
    stats = TensorStats()
    stats.update(np.random.default_rng(0).normal(size=10_000))
    lo, hi = compute_range(stats, halfmax)
    assert (lo, hi) == pytest.approx((stats.min / 2, stats.max / 2))
    t = max(-lo, hi)
    assert compute_range(stats, halfmax, symmetric=True) == pytest.approx((-t, t))
    assert "'halfmax'" in str(pytest.raises(ConfigError, CalibrationMethod.parse, "halfmx").value)


def test_a_new_calibration_method_builds_a_real_model(halfmax):
    assert CALIBRATIONS is SEARCHED  # step 2's "search it by default" list is the space's
    adapter = FXAdapter(tiny_job.model(), tiny_job.calibration())
    space = replace(adapter.space, calibrations=(*SEARCHED, halfmax))
    config = space.validate(QuantConfig(calibration=halfmax))
    assert space.restrict(Restriction(calibration=halfmax)).calibrations == (halfmax,)
    x, fp32 = tiny_job._inputs(), tiny_job.model()
    with torch.inference_mode():
        error = {method: float((adapter.build(replace(config, calibration=method))(x) - fp32(x)).abs().max())
                 for method in ("minmax", halfmax)}
    assert error[halfmax] > 2 * error["minmax"]  # clipping half of every range costs accuracy: it was used
