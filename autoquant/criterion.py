"""The accuracy goal: how much a quantized model may lose against the FP32 baseline."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from autoquant.errors import ConfigError


@dataclass(frozen=True)
class AccuracyCriterion:
    """Exactly one of ``relative`` or ``absolute`` is the tolerated loss.

    The loss is measured in the direction that hurts: for a higher-is-better metric (accuracy, F1,
    Spearman) a drop; for a lower-is-better metric (a loss, WER) a rise. A relative loss is the
    change divided by ``|baseline|``, so negative metrics work; it is undefined for a zero baseline.

    A relative tolerance of 1 or more for a higher-is-better metric (losing all of it) is almost
    surely a percent typed as a fraction (1.5 for 1.5%), so it is refused unless
    ``allow_large_relative=True``.

    >>> AccuracyCriterion(relative=0.01).passes(0.90, 0.892)
    True
    >>> AccuracyCriterion(absolute=0.5, higher_is_better=False).passes(10.0, 10.6)
    False
    """

    relative: float | None = None
    absolute: float | None = None
    higher_is_better: bool = True
    allow_large_relative: bool = False

    def __post_init__(self) -> None:
        if (self.relative is None) == (self.absolute is None):
            raise ConfigError(
                "AccuracyCriterion needs exactly one of relative= or absolute= "
                "(e.g. relative=0.01 for 'lose at most 1%')."
            )
        if not (math.isfinite(self.tolerance) and self.tolerance >= 0):
            raise ConfigError(f"AccuracyCriterion tolerance must be a finite number >= 0, got {self.tolerance!r}.")
        if self.relative is not None and self.relative >= 1 and self.higher_is_better and not self.allow_large_relative:
            raise ConfigError(
                f"relative={self.relative:g} allows losing {self.relative:.0%} of a higher-is-better metric: "
                f"a tolerance is a fraction, so write {self.relative / 100:g} for {self.relative:g}%. "
                "If you mean it, set allow_large_relative=True (YAML: allow_large_relative: true)."
            )

    @property
    def kind(self) -> str:
        return "relative" if self.relative is not None else "absolute"

    @property
    def tolerance(self) -> float:
        value = self.relative if self.relative is not None else self.absolute
        assert value is not None  # __post_init__ insists on one of them
        return value

    def loss(self, baseline: float, value: float) -> float:
        """How much worse ``value`` is than ``baseline`` (negative when it is better)."""
        worse_by = baseline - value if self.higher_is_better else value - baseline
        if self.relative is None:
            return worse_by
        if baseline == 0:
            raise ConfigError(
                "A relative criterion is undefined for a baseline metric of 0: use absolute= instead."
            )
        return worse_by / abs(baseline)

    def allowed(self, baseline: float) -> float:
        """The tolerated loss in the metric's own units."""
        return self.tolerance * abs(baseline) if self.relative is not None else self.tolerance

    def passes(self, baseline: float, value: float) -> bool:
        # A hair of slack so that a loss equal to the tolerance passes despite float rounding.
        return self.loss(baseline, value) <= self.tolerance + 1e-12

    def describe(self) -> str:
        direction = "higher is better" if self.higher_is_better else "lower is better"
        amount = f"{self.relative:.4g} relative" if self.relative is not None else f"{self.absolute:.4g} absolute"
        return f"lose at most {amount} ({direction})"


# How a metric that counts samples is recognised (metric_step).
MIN_VALUES = 3
FLOAT32_ERROR = 2e-7  # three times float32's rounding of a value near 1
CHANCE_FIT = 1e-3  # the chance, at most, that values on no grid fit one
MAX_SAMPLES = 100_000  # 1/N: a step smaller than 1e-5 is one no goal is near


def metric_step(values: Iterable[float], below: float) -> float | None:
    """The step 1/N of a metric that counts over N samples (an accuracy over a test set), looked for
    only where it is coarser than ``below``: the smallest N < 1/below of which every value is a
    multiple. None where none fits, or where the values are too few for a fit to mean anything: two
    counts over 597 samples share the factor 3 (a grid of 199) one time in nine, three one in 27.

    >>> metric_step([585 / 597, 583 / 597, 584 / 597], below=0.001)
    0.0016750418760469012
    >>> metric_step([0.8672, 0.8665, 0.8641], below=0.001) is None  # a Spearman correlation
    True
    """
    distinct = np.unique(np.asarray(list(values), dtype=np.float64))
    if not below > 0 or len(distinct) < MIN_VALUES:
        return None
    n = np.arange(2, min(math.ceil(1 / below), MAX_SAMPLES), dtype=np.float64)
    slack = FLOAT32_ERROR * n[:, None] * np.maximum(1.0, np.abs(distinct))  # a float32 metric's rounding, in samples
    if (2 * slack).prod(axis=1).sum() > CHANCE_FIT:  # values on no grid would fit some N by chance
        return None
    scaled = distinct * n[:, None]
    fits = (np.abs(scaled - np.round(scaled)) <= slack).all(axis=1)
    return 1.0 / float(n[fits.argmax()]) if fits.any() else None


def step_advice(criterion: AccuracyCriterion, baseline: float, step: float) -> str:
    """What a goal finer than one step of the metric means, and the goals that are not."""
    allowed = criterion.allowed(baseline)
    least = step / abs(baseline) if criterion.relative is not None else step
    scale = 10 ** (1 - math.floor(math.log10(least)))  # two significant digits, rounded up
    least, samples = math.ceil(least * scale) / scale, round(1 / step)
    return (f"the metric moves in steps of {step:.3g} (every value measured so far is a multiple of 1/{samples}, "
            f"as an accuracy over {samples} samples is) and the goal allows a loss of {allowed:.3g}, less "
            "than one step: a candidate passes only if it loses no sample, net, so single samples decide pass or "
            f"fail, which no output probe predicts. Evaluate on more samples, or allow at least one step "
            f"({criterion.kind}={least:g})")


# The goal when none is given, in the Python API and in YAML alike.
DEFAULT_CRITERION = AccuracyCriterion(relative=0.01)
