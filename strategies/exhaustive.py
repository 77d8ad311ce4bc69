"""Exhaustive search: the whole grid, cheapest-to-lose-speed first."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence

import optuna

from autoquant.space import QuantConfig, Space

from .base import SearchExhausted, Strategy, tried_keys


class ExhaustiveStrategy(Strategy):
    """Every candidate, in an order that keeps speed as long as possible.

    First all knob combinations with every op INT8 (preferred values first), then every single-op
    fallback, then every pair, and so on. The next candidate is the first one of that order that
    is not yet in the study, so resumed or parallel runs continue the same grid.
    """

    name = "exhaustive"

    def propose(self, space: Space, trials: Sequence[optuna.trial.FrozenTrial]) -> QuantConfig:
        tried = tried_keys(trials)
        for config in grid(space):
            if config.key() not in tried:
                return config
        raise SearchExhausted(f"all {space.size()} candidates of the space were tried")


def grid(space: Space) -> Iterator[QuantConfig]:
    """The whole space, by number of FP32 ops, then knob preference, then op order."""
    knob_configs = space.knob_configs()
    most = max(len(space.tunable_ops(c.approach)) for c in knob_configs)
    for n_fp32 in range(most + 1):
        for knobs in knob_configs:
            names = [op.name for op in space.tunable_ops(knobs.approach)]
            for fallback in itertools.combinations(names, n_fp32):
                yield QuantConfig(**{**knobs.__dict__, "fp32_ops": frozenset(fallback)})
