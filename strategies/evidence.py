"""The loss model of the sensitivity strategy: probe error mapped to measured loss, refitted every trial.

A candidate's accuracy loss is predicted as ``log loss = a + b log(probe error) + d[knobs] + noise``:
``a`` and ``b`` map the probe's scale to the user's metric (``b`` has a prior of 1, a loss proportional
to the probe error, that one trial cannot move), ``d`` is a per-knob-setting correction shrunk
towards 0 (a setting the probe misjudges learns it from its own trials), and the noise's spread
``s`` comes from the residuals with a prior of one natural-log unit (a factor of e), so that with
few trials the model stays humble. Losses below a tenth of the tolerance count as a tenth of it:
how far below the goal a passing candidate lands does not matter.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

PRIOR_SPREAD = 1.0  # natural-log units: before evidence, a loss may be e times off the prediction
PRIOR_WEIGHT = 2.0  # the prior spread counts as this many residuals
SLOPE_PRIOR_WEIGHT = 1.0  # the prior slope of 1 counts as this much squared log-error spread
KNOB_SHRINK = 1.0  # a knob setting's correction counts this many zero residuals
FLOOR = 0.1  # losses below FLOOR * tolerance are read as FLOOR * tolerance


@dataclass(frozen=True)
class Observation:
    knobs: str  # the candidate's knob setting (QuantConfig.describe())
    probe_error: float
    loss: float


@dataclass(frozen=True)
class Prediction:
    loss: float  # the median predicted loss
    p_pass: float  # probability that the measured loss is within the tolerance


class LossModel:
    """Fitted to every measured trial; ``predict`` gives the median loss and the chance to pass.

    >>> model = LossModel(0.01, [Observation("static/minmax", 1e-3, 0.02)])
    >>> round(model.predict("static/minmax", 1e-3).loss, 4), model.predict("static/minmax", 0.0).p_pass
    (0.02, 1.0)
    """

    def __init__(self, tolerance: float, observations: list[Observation]) -> None:
        self.tolerance = tolerance
        self.floor = FLOOR * tolerance if tolerance > 0 else 1e-12
        points = [(o.knobs, math.log(o.probe_error), self._log_loss(o.loss)) for o in observations
                  if o.probe_error > 0]
        self.n = len(points)
        self.offset, self.slope = _fit_line([(z, y) for _, z, y in points])
        offset = self.offset or 0.0  # None only without points
        by_knobs: dict[str, list[float]] = defaultdict(list)
        for knobs, z, y in points:
            by_knobs[knobs].append(y - offset - self.slope * z)
        self.knob_shift = {k: sum(rs) / (len(rs) + KNOB_SHRINK) for k, rs in by_knobs.items()}
        residuals = [y - offset - self.slope * z - self.knob_shift[k] for k, z, y in points]
        self.spread = math.sqrt((sum(e * e for e in residuals) + PRIOR_SPREAD**2 * PRIOR_WEIGHT)
                                / (len(residuals) + PRIOR_WEIGHT))

    def _log_loss(self, loss: float) -> float:
        return math.log(max(loss, self.floor))

    def predict(self, knobs: str, probe_error: float) -> Prediction:
        if probe_error <= 0:  # the candidate's outputs are FP32's: nothing to lose
            return Prediction(0.0, 1.0)
        if self.offset is None:
            return Prediction(self.tolerance, 0.5)
        log_loss = self.offset + self.slope * math.log(probe_error) + self.knob_shift.get(knobs, 0.0)
        spread = self.spread * math.sqrt(1 + 1 / max(self.n, 1))
        z = (math.log(max(self.tolerance, 1e-300)) - log_loss) / spread
        return Prediction(math.exp(log_loss), 0.5 * math.erfc(-z / math.sqrt(2)))

    def describe(self) -> str:
        if self.offset is None:
            return "no measured trial yet"
        return (f"loss = {math.exp(self.offset):.3g} x probe error^{self.slope:.2f}, fitted to {self.n} trial(s), "
                f"spread x{math.exp(self.spread):.2f}")


def _fit_line(points: list[tuple[float, float]]) -> tuple[float | None, float]:
    """Least squares y = a + b z with a ridge pulling b towards 1; (None, 1) without points."""
    if not points:
        return None, 1.0
    n = len(points)
    sz, sy = sum(z for z, _ in points), sum(y for _, y in points)
    szz, szy = sum(z * z for z, _ in points), sum(z * y for z, y in points)
    # Normal equations of sum (y - a - b z)^2 + w (b - 1)^2.
    w = SLOPE_PRIOR_WEIGHT
    det = n * (szz + w) - sz * sz
    b = (n * (szy + w) - sz * sy) / det
    return (sy - b * sz) / n, b
