"""Search strategies, by name."""

from __future__ import annotations

import difflib

from autoquant.errors import ConfigError
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
    if name not in STRATEGIES:
        hint = difflib.get_close_matches(str(name), list(STRATEGIES), n=1)
        did_you_mean = f" Did you mean '{hint[0]}'?" if hint else ""
        raise ConfigError(f"Unknown strategy '{name}'.{did_you_mean} Known strategies: {', '.join(STRATEGIES)}.")
    return STRATEGIES[name](seed=seed)


__all__ = ["STRATEGIES", "SearchExhausted", "Strategy", "get_strategy"]
