"""The accuracy goal: how much a quantized model may lose against the FP32 baseline."""

from __future__ import annotations

import math
from dataclasses import dataclass

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

    def passes(self, baseline: float, value: float) -> bool:
        # A hair of slack so that a loss equal to the tolerance passes despite float rounding.
        return self.loss(baseline, value) <= self.tolerance + 1e-12

    def describe(self) -> str:
        direction = "higher is better" if self.higher_is_better else "lower is better"
        amount = f"{self.relative:.4g} relative" if self.relative is not None else f"{self.absolute:.4g} absolute"
        return f"lose at most {amount} ({direction})"


# The goal when none is given, in the Python API and in YAML alike.
DEFAULT_CRITERION = AccuracyCriterion(relative=0.01)
