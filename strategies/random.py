"""Random search: every knob and every op's INT8/FP32 choice drawn uniformly (Optuna's RandomSampler)."""

from __future__ import annotations

from .base import Strategy


class RandomStrategy(Strategy):
    """Uniform random candidates; the seed fixes the sequence.

    >>> RandomStrategy(seed=0).create_sampler()  # doctest: +ELLIPSIS
    <optuna.samplers._random.RandomSampler object at ...>
    """

    name = "random"
