"""Bayesian search with Optuna's Tree-structured Parzen Estimator."""

from __future__ import annotations

import optuna

from .base import Strategy


class BayesianStrategy(Strategy):
    """TPE over knobs and per-op fallbacks, minimising the tuner's objective.

    The objective ranks every passing candidate (by its share of FP32 ops) before every failing
    one (by its accuracy loss), so TPE learns both what breaks accuracy and what costs speed.
    """

    name = "bayesian"

    def __init__(self, *, seed: int | None = None, n_startup_trials: int = 5) -> None:
        super().__init__(seed=seed)
        self.n_startup_trials = n_startup_trials

    def create_sampler(self) -> optuna.samplers.BaseSampler:
        return optuna.samplers.TPESampler(seed=self.seed, n_startup_trials=self.n_startup_trials)
