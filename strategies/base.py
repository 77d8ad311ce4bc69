"""What every search strategy is: a sampler for Optuna plus, optionally, its own proposals."""

from __future__ import annotations

from abc import ABC
from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar

import optuna

from autoquant.criterion import AccuracyCriterion
from autoquant.probe import OutputProbe
from autoquant.space import QuantConfig, Space
from autoquant.trials import records
from autoquant.trials import tried_keys as _tried_keys

if TYPE_CHECKING:
    import pandas as pd


class SearchExhausted(Exception):
    """Raised by ``Strategy.propose`` when no untried candidate is left."""


class Strategy(ABC):
    """A search strategy over a :class:`~autoquant.space.Space`.

    Before the search the tuner calls ``setup`` once with the space, the criterion and an
    :class:`~autoquant.probe.OutputProbe` (a cheap output-error measure that needs no eval_fn).
    Then, each trial, ``propose``: a strategy that plans its own candidates returns one (the
    tuner enqueues it in the Optuna study, so it is recorded like any other trial); one that
    returns None lets ``create_sampler``'s sampler choose through ``Space.suggest``. ``trials``
    holds every trial in the study so far, other workers' and earlier runs' included, so a
    strategy that reads only them resumes and shares work for free.
    """

    name: ClassVar[str]

    def __init__(self, *, seed: int | None = None) -> None:
        self.seed = seed

    def create_sampler(self) -> optuna.samplers.BaseSampler:
        return optuna.samplers.RandomSampler(seed=self.seed)

    def setup(self, space: Space, probe: OutputProbe, criterion: AccuracyCriterion | None = None) -> None:
        """Called once before the search with the goal; the default needs nothing."""

    @property
    def sensitivity(self) -> pd.DataFrame | None:
        """A per-op ranking table, for strategies that make one."""
        return None

    @property
    def probe_cost(self) -> str:
        """What the output probe spent (builds, model runs, seconds), for the result; "" if nothing."""
        return ""

    def propose(self, space: Space, trials: Sequence[optuna.trial.FrozenTrial]) -> QuantConfig | None:
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(seed={self.seed})"


def tried_keys(trials: Sequence[optuna.trial.FrozenTrial]) -> set[str]:
    """Config keys of trials that ran or are running (finished, failed or in flight)."""
    return _tried_keys(records(trials))
