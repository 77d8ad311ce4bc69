"""Sensitivity-guided search: rank ops by their output error, then fall back as few as possible.

Quantization loss usually sits in a few ops. When the default candidate fails, ``rank`` measures
with the :class:`~autoquant.probe.OutputProbe` (one calibration batch, no eval_fn) which
calibration suits the model, how much each op costs, and which calibration suits the costliest
ops. ``propose`` then
replays a fixed plan against the study's trials: every step reads its outcome from a finished
trial, and the first step without one is the next proposal. The plan is therefore a function of
the study alone, so a resumed job or a second worker continues it instead of starting over.

The plan, cheapest-to-lose-speed first:

1. the default candidate (the tuner's first trial), then all INT8 with the calibration and scheme
   the probe prefers, then that with per-op calibration overrides for the top-ranked ops;
2. fall back the ranked prefix in growing groups (1, 2, 4, ... ops) until a candidate passes;
3. with the ``latency`` objective (the tuner keeps searching after a pass): binary search for the
   shortest passing prefix, then try to re-quantize each fallen-back op, least sensitive first.

If nothing passes, not even with every op in FP32, the rest of the budget goes to the remaining
space in the exhaustive strategy's order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import optuna
import pandas as pd

from autoquant.errors import ConfigError, unknown_choice
from autoquant.probe import OutputProbe
from autoquant.space import QuantConfig, Space

from .base import SearchExhausted, Strategy
from .exhaustive import grid

# "int8": output error with only that op INT8 (all others FP32): the op's own damage, in isolation.
# "fp32": how much the output error of the all-INT8 candidate drops with only that op in FP32.
MEASURES = ("int8", "fp32")


@dataclass(frozen=True)
class OpSensitivity:
    """One op's cost: ``score`` is a relative squared output error (higher hurts more)."""

    op: str
    op_type: str
    score: float
    calibration: str | None = None  # a per-op calibration override the probe preferred, if any


class _Unknown(Exception):
    """The plan needs the outcome of ``config``, which no trial has yet."""

    def __init__(self, config: QuantConfig) -> None:
        super().__init__(config.key())
        self.config = config


class SensitivityStrategy(Strategy):
    """Ranks ops once with the output probe, then falls back the ranked prefix in growing groups.

    ``measure`` picks the ranking ("int8" or "fp32", see ``MEASURES``); ``calibrate_top`` is how
    many top-ranked ops get a per-op calibration search before any op falls back. Once measured
    (``rank``, called by the first ``propose``), ``ranking`` lists every searched op, most
    sensitive first, and ``sensitivity`` is the same as a DataFrame.

    >>> SensitivityStrategy(measure="fp32").measure
    'fp32'
    """

    name = "sensitivity"

    def __init__(self, *, seed: int | None = None, measure: str = "int8", calibrate_top: int = 3) -> None:
        super().__init__(seed=seed)
        if measure not in MEASURES:
            raise unknown_choice("sensitivity measure", measure, MEASURES)
        if calibrate_top < 0:
            raise ConfigError(f"calibrate_top must be 0 or more, got {calibrate_top}.")
        self.measure = measure
        self.calibrate_top = calibrate_top
        self.ranking: list[OpSensitivity] = []
        self.base: QuantConfig | None = None  # all INT8, the knobs the probe preferred
        self._space: Space | None = None
        self._probe: OutputProbe | None = None
        self.start: QuantConfig | None = None  # ``base`` plus the per-op calibration overrides

    # --- before the search: the probe ------------------------------------------------------------
    def setup(self, space: Space, probe: OutputProbe) -> None:
        """Keeps the probe; the ranking is measured when the search first needs it (``rank``), so a
        job whose default candidate already passes spends nothing on it."""
        self._space, self._probe = space, probe
        self.ranking, self.base, self.start = [], None, None

    def rank(self) -> list[OpSensitivity]:
        """Measure (once per job) the knobs, the per-op sensitivity and the top ops' calibration."""
        if self.start is not None:
            return self.ranking
        if self._probe is None:
            raise ConfigError("SensitivityStrategy needs setup(space, probe) first (the tuner calls it).")
        space, probe, measured = self._space, self._probe, {}

        def error(config: QuantConfig) -> float:  # each distinct candidate is built and run once
            key = space.canonical(config).key()
            if key not in measured:
                measured[key] = probe.error(config)
            return measured[key]

        self.base = self._best_knobs(space, error)
        names = [op.name for op in space.tunable_ops(self.base.approach)]
        types = {op.name: op.op_type for op in space.ops}
        base_error = error(self.base)
        scores = {}
        for name in names:
            if self.measure == "int8":
                scores[name] = error(replace(self.base, fp32_ops=frozenset(names) - {name}))
            else:
                scores[name] = base_error - error(replace(self.base, fp32_ops=frozenset({name})))
        order = sorted(names, key=lambda n: (-scores[n], names.index(n)))  # ties: graph order
        overrides = self._best_overrides(space, error, order[: self.calibrate_top], base_error)
        self.ranking = [OpSensitivity(n, types[n], scores[n], overrides.get(n)) for n in order]
        self.start = space.canonical(replace(self.base, op_calibration=overrides))
        return self.ranking

    def _best_knobs(self, space: Space, error: Callable[[QuantConfig], float]) -> QuantConfig:
        """All INT8 with the calibration, then the scheme, of least output error (static only)."""
        config = space.default_config()
        if config.approach != "static":
            return config
        for knob in ("calibration", "scheme"):
            errors = {value: error(replace(config, **{knob: value})) for value in space.choices(knob)}
            config = replace(config, **{knob: min(errors, key=errors.__getitem__)})  # ties: first value
        return config

    def _best_overrides(self, space: Space, error: Callable[[QuantConfig], float], ops: Sequence[str],
                        base_error: float) -> dict[str, str]:
        """For each op, the calibration of its input activations that lowers the output error most."""
        if self.base.approach != "static":
            return {}
        overrides = {}
        for op in ops:
            errors = {
                method: error(replace(self.base, op_calibration={op: method}))
                for method in space.calibrations if method != self.base.calibration
            }
            if errors:
                method = min(errors, key=errors.__getitem__)
                if errors[method] < base_error:
                    overrides[op] = method
        if len(overrides) > 1 and error(replace(self.base, op_calibration=overrides)) >= base_error:
            return {}  # each helps alone but not together: keep the plain base
        return overrides

    @property
    def sensitivity(self) -> pd.DataFrame | None:
        """The ranking as a table (rank, op, op_type, sensitivity, measure, calibration); None before setup."""
        if not self.ranking:
            return None
        return pd.DataFrame([
            {"rank": i + 1, "op": r.op, "op_type": r.op_type, "sensitivity": r.score, "measure": self.measure,
             "calibration": r.calibration or ""}
            for i, r in enumerate(self.ranking)
        ])

    # --- the search: a replay of the plan against the study ---------------------------------------
    def propose(self, space: Space, trials: Sequence[optuna.trial.FrozenTrial]) -> QuantConfig:
        self.rank()
        outcomes = _outcomes(trials)

        def passed(config: QuantConfig) -> bool:
            key = space.canonical(config).key()
            if key not in outcomes:
                raise _Unknown(space.canonical(config))
            return outcomes[key]

        try:
            self._plan(space, passed)
        except _Unknown as need:
            return need.config
        if any(outcomes.values()):
            raise SearchExhausted("the sensitivity plan is complete")
        # Nothing passed, not even with every op in FP32 under the probe's knobs: the budget goes to
        # the rest of the space, in the exhaustive strategy's speed-keeping order.
        for config in grid(space):
            if space.canonical(config).key() not in outcomes:
                return config
        raise SearchExhausted(f"all {space.size()} candidates of the space were tried")

    def _plan(self, space: Space, passed: Callable[[QuantConfig], bool]) -> None:
        """The whole search; ``passed`` raises _Unknown for a candidate not yet evaluated."""
        # 1. All INT8: the tuner's default, the probe's knobs, then per-op calibration for the top ops.
        if passed(space.default_config()) or passed(self.base) or passed(self.start):
            return
        ranked = [r.op for r in self.ranking]
        if not ranked:
            return

        def fallback(ops: Sequence[str]) -> QuantConfig:
            return replace(self.start, fp32_ops=frozenset(ops))

        # 2. Growing groups of the ranked prefix until one passes.
        lo, n = 0, 1
        while not passed(fallback(ranked[:n])):
            if n == len(ranked):
                return  # not even every searched op in FP32 passes
            lo, n = n, min(2 * n, len(ranked))
        # 3. (Only reached when the tuner goes on after a pass.) The shortest passing prefix...
        hi = n
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if passed(fallback(ranked[:mid])) else (mid, hi)
        # ... then re-quantize what fell back needlessly, least sensitive first. ranked[hi - 1] is
        # needed: the prefix without it failed.
        kept = list(ranked[:hi])
        for op in reversed(ranked[: hi - 1]):
            fewer = [o for o in kept if o != op]
            if passed(fallback(fewer)):
                kept = fewer


def _outcomes(trials: Sequence[optuna.trial.FrozenTrial]) -> dict[str, bool]:
    """Config key -> passed, for every trial tried. A trial that failed to build, or is still
    running (another worker's), counts as not passed: the plan moves on rather than waiting."""
    outcomes: dict[str, bool] = {}
    for t in trials:
        key = t.user_attrs.get("config_key")
        if key is not None:
            outcomes[key] = outcomes.get(key, False) or bool(t.user_attrs.get("passed", False))
    return outcomes
