"""Which whole-model knob settings the probe scores, when it cannot afford them all.

The settings multiply (granularity x calibration x scheme x SmoothQuant alpha: 80 on a transformer)
and each costs a build. The screen scores the default setting, every setting that changes one
knob from it (the main effects) and every activation range (calibration x scheme, the rest at the
default: the two interact, as both set the range, and a clipping method may only pay with a
symmetric grid), then fits the log probe error as a sum of one effect per knob value (least
squares) and scores, while the caller's budget allows, the unscored setting the fit predicts best,
refitting after each. An unscored setting is given the fit's prediction; one that
shares a knob value with which nothing could be built is taken as unbuildable too.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from autoquant.space import QuantConfig

FIELDS = ("approach", "granularity", "calibration", "scheme", "smooth_alpha")
RANGE_FIELDS = ("calibration", "scheme")  # interacting knobs: every pair of their values is scored
RIDGE = 1e-3  # keeps the least squares defined when effects are collinear (dynamic has no calibration)
TINY = 1e-30  # a zero error (FP32-identical outputs), in logs


class KnobScreen:
    """The knob settings (canonical, all ops INT8, in order of preference) and their predictions.

    >>> configs = [QuantConfig(calibration=c, scheme=s) for s in ("asymmetric", "symmetric")
    ...            for c in ("minmax", "entropy")]
    >>> screen = KnobScreen(configs)
    >>> [c.describe() for c in screen.first()]  # the default, one-knob changes, every activation range
    ['static/minmax/asymmetric/per_channel', 'static/entropy/asymmetric/per_channel', \
'static/minmax/symmetric/per_channel', 'static/entropy/symmetric/per_channel']
    >>> from dataclasses import replace
    >>> configs += [replace(c, granularity="per_tensor") for c in configs]
    >>> screen = KnobScreen(configs)
    >>> errors = {c.key(): e for c, e in zip(screen.first(), (1e-2, 1e-3, 1e-2, 1e-2, 1e-3), strict=True)}
    >>> f"{screen.predict(errors)[configs[5].key()]:.0e}"  # entropy's gain carries over to per-tensor
    '1e-03'
    """

    def __init__(self, configs: Sequence[QuantConfig]) -> None:
        self.configs = list(configs)
        self._values = [sorted({_value(c, f) for c in self.configs}) for f in FIELDS]

    def first(self) -> list[QuantConfig]:
        """The default setting, each approach's first, each setting one knob away from the default,
        then each activation range (the other knobs at the default): in the order a tight budget
        drops them from the end."""
        default = self.configs[0]
        approaches = list({c.approach: c for c in reversed(self.configs)}.values())[::-1]  # each one's first
        changes = [c for c in self.configs if sum(getattr(c, f) != getattr(default, f) for f in FIELDS) == 1]
        ranges = [c for c in self.configs
                  if all(getattr(c, f) == getattr(default, f) for f in FIELDS if f not in RANGE_FIELDS)]
        return list(dict.fromkeys([default, *approaches, *changes, *ranges]))

    def predict(self, errors: Mapping[str, float | None]) -> dict[str, float | None]:
        """Every setting's error: ``errors`` where scored (None: could not be built), else the fit's."""
        scored = [c for c in self.configs if c.key() in errors]
        built = [c for c in scored if errors[c.key()] is not None]
        broken = {(f, v) for f in FIELDS for v in {_value(c, f) for c in scored}
                  if all(errors[c.key()] is None for c in scored if _value(c, f) == v)}
        weights = self._fit(built, [math.log(max(errors[c.key()] or 0.0, TINY)) for c in built])
        predicted: dict[str, float | None] = {}
        for config in self.configs:
            if config.key() in errors:
                predicted[config.key()] = errors[config.key()]
            elif any((f, _value(config, f)) in broken for f in FIELDS) or weights is None:
                predicted[config.key()] = None
            else:
                predicted[config.key()] = math.exp(float(self._features(config) @ weights))
        return predicted

    def next(self, errors: Mapping[str, float | None]) -> QuantConfig | None:
        """The unscored setting with the lowest predicted error (the earliest on ties); None if none is left."""
        predicted = self.predict(errors)
        left = [c for c in self.configs if c.key() not in errors and predicted[c.key()] is not None]
        return min(left, key=lambda c: predicted[c.key()] or 0.0, default=None)

    def _features(self, config: QuantConfig) -> np.ndarray:
        """An intercept and one indicator per knob value."""
        return np.array([1.0] + [float(_value(config, f) == v) for f, values in zip(FIELDS, self._values, strict=True)
                                 for v in values])

    def _fit(self, configs: list[QuantConfig], targets: list[float]) -> np.ndarray | None:
        if not configs:
            return None
        x = np.array([self._features(c) for c in configs])
        # The ridge pulls effects (not the intercept) towards 0: a value never scored predicts the mean.
        penalty = math.sqrt(RIDGE) * np.eye(x.shape[1])[1:]
        a = np.vstack([x, penalty])
        b = np.concatenate([np.array(targets), np.zeros(len(penalty))])
        return np.linalg.lstsq(a, b, rcond=None)[0]


def _value(config: QuantConfig, field: str) -> str:
    return str(getattr(config, field))

