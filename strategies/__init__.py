"""Search strategies, by name."""

from __future__ import annotations

from autoquant.errors import check_choice

from .base import SearchExhausted, Strategy
from .bayesian import BayesianStrategy
from .exhaustive import ExhaustiveStrategy
from .random import RandomStrategy
from .sensitivity import SensitivityStrategy

STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (ExhaustiveStrategy, RandomStrategy, BayesianStrategy, SensitivityStrategy)
}


def get_strategy(name: str | Strategy, *, seed: int | None = None) -> Strategy:
    """A strategy instance from its name (or the instance itself)."""
    if isinstance(name, Strategy):
        return name
    return STRATEGIES[check_choice("strategy", name, STRATEGIES)](seed=seed)


__all__ = ["STRATEGIES", "SearchExhausted", "Strategy", "get_strategy"]
