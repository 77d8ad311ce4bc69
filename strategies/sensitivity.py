"""The default strategy: the fastest candidate a loss model, refitted on every trial, says will pass.

How it decides (each proposal is logged with its prediction):

1. The probe (:mod:`autoquant.probe`, no eval_fn) scores whole-model knob settings with all ops
   INT8 by their output error against FP32 (KL divergence for logits): every one if its budget
   allows, else the default, then (while they leave room for the profile's ranking) each
   approach's first, each one-knob change and each activation range, and, while the budget
   lasts, the settings a fit of per-knob effects predicts best (:mod:`strategies.knob_screen`); the rest keep the
   fit's prediction until one is chosen, and is then probed exactly.
2. A loss model (:mod:`strategies.evidence`) maps probe error to the user's loss; it is refitted
   to every measured trial (the default candidate, the tuner's first trial, is the first point),
   with a per-knob-setting correction and a spread, so it gives each candidate a chance to pass.
3. The next candidate is the fastest untried one whose chance to pass is at least ``confidence``
   (ties: fewer FP32 ops, then the higher chance). All-INT8 knob settings are the fastest, so
   they come first while the model says one can pass. A candidate's all-INT8 latency is that of
   its kernel family (approach, activation scheme, weight granularity: ONNX Runtime runs int8
   activations on other kernels than uint8): measured by an all-INT8 trial of it (the default,
   the first trial), else once a candidate of the family would be chosen. From the second
   proposal in a row that failed, each halves the accepted chance of failing (0.5, 0.5, 0.75,
   0.875, ...): one miss is what the refitted model learns from, but choosing the candidate whose
   probe error is luckiest makes near misses come in runs (the winner's curse).
4. Otherwise ops fall back. Per op, once, at the best knob setting of the fastest approach known
   faster than FP32 (where none is, of the approach that quantizes the most ops, whose per-type
   costs may still find the types whose INT8 pays): its share of the probe error with only it INT8 (or, with
   ``measure="fp32"``, the error it removes in FP32) and its latency cost (how much slower all
   INT8 runs with it in FP32; per op type, split evenly, where one measurement per op would
   exceed the probe's budget of two eval_fn calls, and as many types as it affords, those with
   the most ops first, the others together; likewise the error, per run of consecutive ops
   where one candidate per op would, as many runs as it affords, 8 at least). A cost is
   negative where falling the op back ran faster,
   0 where the measurements could not tell (where no op is known to gain, those are measured
   again, longer: one eval_fn call's time among them, if the probe's budget has it left); costs
   add up to at least all INT8's saving. The latencies a step needs at once (each approach's all
   INT8; all INT8 and the fallback groups) are timed together, sharing FP32's runs; a group's
   cost is taken against all INT8 timed again in its own pass.
   A candidate's error is predicted as the knob setting's error times the share of the error its
   INT8 ops carry, raised to a power g fitted to every fallback probed exactly (1 before any:
   shares measured one op or one run of ops at a time need not add up); where fallbacks at the
   same knob setting were probed exactly, from those nested with it instead: between the nearest
   one it extends and the nearest that extends it, interpolated (log error over log share), past
   the one it extends, from it by share^g (a ranking whose first ops carry little of the error
   then takes one step, not one op at a time); its latency as the sum
   of its FP32 ops' costs, plus how much slower than predicted the approach's measured fallback
   trials ran (costs measured one at a time need not add up: two
   neighbours in FP32 pay a quantize between them). Candidates are the prefixes of two rankings
   (by error share, and by error share per latency cost: a greedy knapsack, so cheap ops can close
   a gap that a dear op ranks first for) and the one-op changes of every measured trial, each
   also with every negative-cost op in FP32, so a near miss leads to the cheapest op that the
   model says closes the gap, and an INT8 kernel slower than FP32's falls back for speed. Where
   the fastest pass is slower than FP32 and no candidate of the approaches profiled so far is
   predicted faster, the others are profiled too
   (each candidate's latency is predicted from its own approach's costs). The chosen candidate is
   probed exactly before it is proposed (and another chosen if that changes the verdict; after
   8 such probes, the fastest one probed exactly that is likely to pass).
   Once a pass slower than FP32 is measured, a candidate must be predicted faster than it (as
   measured) by more than DRIFT, the drift between two measurements of one model.

With ``objective="latency"`` it goes on while an untried candidate is predicted faster than the
fastest pass (by DRIFT) and likely to pass. The proposal is a function of the study's trials (and the
probe, which is deterministic), so resumed runs and several workers continue one search. The
latency costs are measured once per run and rounded; on a noisy machine two runs may still order
two ops of near-equal cost differently.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import optuna
import pandas as pd

from autoquant.criterion import AccuracyCriterion
from autoquant.errors import AutoquantError, ConfigError, check_choice
from autoquant.latency import LatencyRatio
from autoquant.probe import KINDS, MEASURED_TOGETHER, OutputProbe
from autoquant.space import QuantConfig, Space
from autoquant.trials import Measurement, measured_by_key, records

from .base import SearchExhausted, Strategy, tried_keys
from .evidence import LossModel, Observation, Prediction
from .exhaustive import grid
from .knob_screen import TINY, KnobScreen

log = logging.getLogger("autoquant")

# "int8": the probe error with only that op INT8 (all others FP32): the op's own damage, in isolation.
# "fp32": how much the all-INT8 error drops with only that op in FP32.
MEASURES = ("int8", "fp32")
COST_RESOLUTION = 0.005  # measured savings are rounded to this share of FP32 latency: noise must not reorder
EXACT_PROBES = 8  # at most this many candidates probed exactly per proposal
MIN_ERROR_GROUPS = 8  # runs of ops a profile scores even over its budget (a ranking needs some); the screen leaves room
TOP_KNOBS = 3  # knob settings whose fallback candidates are considered
REFINE_S = 1.0  # a latency group measured again, longer, where no eval_fn time is known
# two measurements of one model, taken apart in time, differ by up to this share (the load drifts)
DRIFT = 0.05
SHARE_PRIOR = 1.0  # the prior exponent 1 of _share_exponent weighs as much as a fallback keeping 1/e of the error
RISK_DECAY = 2.0  # each proposal in a row that failed, after the first, divides the accepted chance of failing


@dataclass(frozen=True)
class OpSensitivity:
    """One op: ``score`` is its share of the probe error; ``latency_cost`` the FP32 latency share its
    INT8 saves (what falling it back costs)."""

    op: str
    op_type: str
    score: float
    latency_cost: float = 0.0


@dataclass(frozen=True)
class _Profile:
    """The per-op profile of one approach: measured at ``reference`` (all INT8), most sensitive op first."""

    reference: QuantConfig
    ranking: tuple[OpSensitivity, ...]


_Point = tuple[float, float]  # (share of the error left INT8, probe error) of a fallback probed exactly


@dataclass(frozen=True)
class _Candidate:
    config: QuantConfig
    latency: float  # predicted, in FP32 latency units above the all-INT8 candidate
    error: float  # probe error, exact or predicted
    exact: bool
    prediction: Prediction


class SensitivityStrategy(Strategy):
    """Proposes the fastest candidate that a loss model, refitted on every trial, says will pass.

    >>> SensitivityStrategy(confidence=0.7).confidence
    0.7
    """

    name = "sensitivity"

    def __init__(self, *, seed: int | None = None, measure: str = "int8", confidence: float = 0.5,
                 probe_output: str = "auto", probe_batches: int | None = None,
                 latency_budget_s: float = 0.03) -> None:
        super().__init__(seed=seed)
        check_choice("sensitivity measure", measure, MEASURES)
        if not 0 < confidence < 1:
            raise ConfigError(f"confidence is a probability between 0 and 1 (exclusive), got {confidence}.")
        check_choice("probe output kind", probe_output, KINDS)
        self.measure, self.confidence = measure, confidence
        self.probe_output, self.probe_batches = probe_output, probe_batches
        self.latency_budget_s = latency_budget_s
        self._search: _Search | None = None  # made by setup

    def setup(self, space: Space, probe: OutputProbe, criterion: AccuracyCriterion | None = None) -> None:
        """Keeps the probe; nothing is probed until the search needs it, so a job whose default
        candidate passes spends nothing on it."""
        if self.probe_output != "auto":
            probe.kind = self.probe_output
        if self.probe_batches is not None:
            probe.max_batches = self.probe_batches
        self._search = _Search(self, space, probe, (criterion or AccuracyCriterion(relative=0.01)).tolerance)

    def profile(self) -> None:
        """All the probe spends before ops fall back: each approach's latency, each knob setting's
        error and the per-op profile at the best one (the search does this lazily; experiments time it)."""
        self._started().profile()

    @property
    def probe_cost(self) -> str:
        probe = self._search.probe if self._search is not None else None
        return probe.cost.describe() if probe is not None and probe.cost.builds else ""

    @property
    def sensitivity(self) -> pd.DataFrame | None:
        """The ranking as a table (rank, op, op_type, sensitivity, latency_cost, measure, calibration)."""
        return self._search.table() if self._search is not None else None

    def propose(self, space: Space, trials: Sequence[optuna.trial.FrozenTrial]) -> QuantConfig:
        return self._started().propose(space, trials)

    def _started(self) -> _Search:
        if self._search is None:
            raise ConfigError("SensitivityStrategy needs setup(space, probe) first (the tuner calls it).")
        return self._search


class _Search:
    """One search's state: the probe, the per-op profile, the loss model (made anew by each setup)."""

    def __init__(self, options: SensitivityStrategy, space: Space, probe: OutputProbe, tolerance: float) -> None:
        self.options, self.space, self.probe, self.tolerance = options, space, probe, tolerance
        self.profiles: dict[str, _Profile] = {}  # by approach; the first measured is the search's main one
        self.approach_latency: dict[str, float] = {}  # all-INT8 latency ratio per approach (its default's)
        # all-INT8 latency ratio per kernel family (approach, scheme, weight granularity), where measured:
        # ONNX Runtime's symmetric (int8) activations run other kernels than asymmetric (uint8)
        self.family_latency: dict[str, float] = {}
        self.paying: set[str] = set()  # approaches whose all-INT8 candidate is known faster than FP32
        self.offsets: dict[str, float] = {}  # per approach: measured minus predicted latency of its fallbacks
        self._measured: list[tuple[QuantConfig, Measurement]] = []  # the trials the last proposal read
        # op -> BF16/FP32 latency, where BF16 is the faster fallback
        self.bf16_ratios = {op.name: op.bf16_ratio for op in space.ops if op.bf16_ratio is not None}
        self.model = LossModel(tolerance, [])
        self.required = options.confidence  # the chance to pass a proposal needs now
        self.unbuildable: set[str] = set()
        # (log share of the error left INT8, log exact / knob error) of each fallback probed exactly
        self.fallback_errors: list[tuple[float, float]] = []
        self.exact_fallbacks: list[tuple[QuantConfig, float]] = []  # (fallback, its exact probe error)
        self.screen = KnobScreen([space.canonical(c) for c in space.knob_configs()])
        self._screened = False
        self._predicted: tuple[frozenset[tuple[str, float | None]], dict[str, float | None]] | None = None
        self._scored: tuple[tuple[int, int], dict[str, float | None]] | None = None  # (probe state, scores)

    def plan(self) -> None:
        """Tell the probe what a full profile spends (candidates scored; latency measured per approach,
        per op type and all INT8), so it fits them in its budget."""
        types = {op.op_type for op in self.space.ops}
        self.probe.plan(len(self.screen.first()) + len(self.space.ops),
                        latency_measurements=len(self.space.approaches) + len(types) + 1)

    def profile(self) -> None:
        self.plan()
        if not self.approach_latency:
            self._measure_approaches(self.space)
        if not self.profiles:
            self._profile(self._best_knobs(self.space, self._first_approach(self.space)))

    def profile_all(self) -> None:
        """Profile every approach not profiled yet that has ops to tune (beyond the probe's budget:
        done only when the fastest pass is slower than FP32 and nothing profiled is predicted faster)."""
        for approach in self._unprofiled(self.space):
            log.info("sensitivity: the fastest pass is slower than FP32 and no candidate profiled so far is predicted "
                     "faster: profiling the %s approach too (beyond the probe's budget)", approach)
            self._profile(self._best_knobs(self.space, approach))

    def _unprofiled(self, space: Space) -> list[str]:
        return [a for a in space.approaches if a not in self.profiles and space.tunable_ops(a)]

    # --- the probe, cached; None for a candidate the backend cannot build --------------------------
    def _error(self, config: QuantConfig) -> float | None:
        key = config.key()
        if key in self.unbuildable:
            return None
        try:
            return self.probe.error(config)
        except AutoquantError:  # the probe logged why
            self.unbuildable.add(key)
            return None

    def _knob_error(self, config: QuantConfig) -> float | None:
        """A knob setting's all-INT8 error: probed if it was, else the screen's prediction."""
        self._screen()
        knobs = self.space.canonical(replace(config, fp32_ops=frozenset()))
        scores = frozenset(self._knob_scores().items())
        if self._predicted is None or self._predicted[0] != scores:  # refitted when a setting is probed
            self._predicted = (scores, self.screen.predict(dict(scores)))
        return self._predicted[1].get(knobs.key())

    def _knob_scores(self) -> dict[str, float | None]:
        """The knob settings probed so far (None: the backend could not build it); read again only
        when the probe has scored or failed a candidate since (this runs for every candidate scored)."""
        state = (self.probe.calls, len(self.unbuildable))
        if self._scored is None or self._scored[0] != state:
            scores: dict[str, float | None] = {}
            for config in self.screen.configs:
                known = self.probe.known(config)
                if known is not None or config.key() in self.unbuildable:
                    scores[config.key()] = known.error if known is not None else None
            self._scored = (state, scores)
        return dict(self._scored[1])

    def _screen(self) -> None:
        """Probe the screen's first settings while the budget leaves room for the profile's ranking,
        then its best predicted ones while it leaves a candidate per op (all of them without a
        budget). Once per search."""
        if self._screened:
            return
        self._screened = True
        first = self.screen.first()
        self.probe.expect(first)
        for i, setting in enumerate(first):
            # the default always; the others while they leave room for the profile's ranking (its
            # runs of ops and all INT8's latency); per-type latency costs come after, from what is left
            fits = self.probe.affordable(reserve=1)
            if i and fits is not None and fits <= min(MIN_ERROR_GROUPS, len(self.space.ops)):
                log.info("sensitivity: %d of the screen's %d first knob settings probed, the rest predicted: more "
                         "would exceed the probe's budget", i, len(first))
                return
            self._error(setting)
        while (config := self.screen.next(self._knob_scores())) is not None:
            fits = self._candidates_left()
            if fits is not None and fits <= len(self.space.ops):
                log.info("sensitivity: %d of %d knob settings probed, the rest predicted from per-knob "
                         "effects (probing all would exceed the probe's budget)", len(self._knob_scores()),
                         len(self.screen.configs))
                break
            self._error(config)

    def _measured_latency(self, config: QuantConfig, budget_s: float | None = None) -> LatencyRatio | None:
        """The probe's latency measurement; None for a candidate the backend cannot build."""
        try:
            return self.probe.latency(config, budget_s or self.options.latency_budget_s)
        except AutoquantError:  # the probe logged why
            return None

    def _measure_together(self, configs: list[QuantConfig], budget_s: float | None = None) -> None:
        """Measure the candidates' latencies in one pass, sharing FP32's runs (read back one by one)."""
        self.probe.latencies(configs, budget_s or self.options.latency_budget_s)

    def _saving(self, config: QuantConfig, budget_s: float | None = None) -> float:
        """The share of FP32 latency the candidate saves (negative: it runs slower); 0 where its
        measurement could not tell faster from slower (noise must not make a cost), or it cannot be built."""
        latency = self._measured_latency(config, budget_s)
        return 1.0 - latency.ratio if latency is not None and latency.excludes(1.0) else 0.0

    def _savings(self, reference: QuantConfig, groups: list[list[str]], budget_s: float) -> dict[str, float]:
        """Per op, what falling its group back from ``reference`` (all INT8) costs, split evenly: the
        group-in-FP32 candidate's latency minus all INT8's, in FP32 latency units (negative where
        the group's INT8 kernels run slower than FP32; 0 where the two measurements cannot tell).
        Measured from all INT8, not with the group INT8 alone: alone, an op pays quantize and
        dequantize at both edges, which all INT8 mostly does not (ONNX Runtime: a lone INT8 conv of
        the digits CNN ran slower than FP32, while all INT8 ran at x0.47). All INT8 is measured
        again in each pass, with the groups it is compared with: two passes differ by more than
        one op's cost."""
        names = frozenset(n for group in groups for n in group)
        costs: dict[int, float] = {}
        fallen = [i for i, group in enumerate(groups) if set(group) != names]
        step = MEASURED_TOGETHER - 1
        for start in range(0, len(fallen), step):
            chunk = fallen[start:start + step]
            int8, *measured = self.probe.latencies_in_one_pass(
                [reference] + [replace(reference, fp32_ops=frozenset(groups[i])) for i in chunk], budget_s)
            costs.update((i, _difference(m, int8)) for i, m in zip(chunk, measured, strict=True))
        savings: dict[str, float] = {}
        for i, group in enumerate(groups):
            # not timed in a pass: the group is every op, so all INT8's saving, by definition
            cost = costs[i] if i in costs else self._saving(reference, budget_s)
            # rounded per group, not per op: a type's cost split over 54 ops is not rounded away
            savings.update((name, _rounded(cost) / len(group)) for name in group)
        return savings

    def _refine_budget(self, groups: list[list[str]]) -> float | None:
        """Seconds for each of the latency groups (and all INT8) measured again: one eval_fn call's
        time among them, within what is left of the probe's budget (REFINE_S each without a budget);
        None where that leaves no more than a first measurement had."""
        budget, eval_s = self.probe.budget_s, self.probe.eval_seconds
        if budget is None or eval_s is None:
            return max(REFINE_S, self.options.latency_budget_s)
        each = min(eval_s, budget - self.probe.cost.seconds) / (len(groups) + 1)
        return each if each > self.options.latency_budget_s else None

    def _profile(self, reference: QuantConfig) -> _Profile:
        """Per op at ``reference`` (all INT8): its share of the probe error and its latency cost."""
        names = [op.name for op in self.space.tunable_ops(reference.approach)]
        types = {op.name: op.op_type for op in self.space.ops}
        self.probe.expect(replace(reference, fp32_ops=frozenset(names) - {n} if self.options.measure == "int8"
                                  else frozenset({n})) for n in names)
        base = self._error(reference) or 0.0
        scores: dict[str, float] = {}
        for group in self._error_groups(names):  # each op alone, or runs of ops, as the budget allows
            if self.options.measure == "int8":
                error = max(self._error(replace(reference, fp32_ops=frozenset(names) - set(group))) or 0.0, 0.0)
            else:
                error = max(base - (self._error(replace(reference, fp32_ops=frozenset(group))) or base), 0.0)
            scores.update((name, error / len(group)) for name in group)
        groups = self._latency_groups(names, types)  # each op alone, or each op type, as the budget allows
        savings = self._savings(reference, groups, self.options.latency_budget_s)
        together = self._saving(reference)
        if not any(s > 0 for s in savings.values()) and together <= 0:
            # INT8 pays nowhere, as measured: where a group's measurement could not tell, a gain too
            # small for it may be all a faster-than-FP32 candidate has
            budget = self._refine_budget(groups)
            if budget is None:
                log.info("sensitivity: no op type's INT8 is known faster than FP32, and the probe's budget is spent: "
                         "not measured again")
            else:
                log.info("sensitivity: no op type's INT8 is known faster than FP32: measuring again, longer, those "
                         "whose measurement could not tell")
                savings, together = self._savings(reference, groups, budget), self._saving(reference, budget)
        costs = _latency_costs(savings, _rounded(together))
        total = sum(scores.values())
        shares = {n: scores[n] / total if total > 0 else 1 / len(names) for n in names}
        order = sorted(names, key=lambda n: (-shares[n], names.index(n)))
        profile = _Profile(reference, tuple(OpSensitivity(n, types[n], shares[n], costs[n]) for n in order))
        self.profiles[reference.approach] = profile
        self._fit_offsets()  # the approach's measured fallbacks now have predictions to correct
        log.info("sensitivity: per-op profile at %s: %s", reference.describe(),
                 ", ".join(f"{r.op} {r.score:.2f} (cost {r.latency_cost:.3f})" for r in profile.ranking[:8]))
        return profile

    def _error_groups(self, names: list[str]) -> list[list[str]]:
        """Each op alone if the probe's budget affords a candidate per op (its latency measurements
        kept back), else as many runs of consecutive ops as it affords, MIN_ERROR_GROUPS at least
        (their error split evenly): a ranking is the least a profile is for."""
        fits = self._candidates_left()
        if fits is None or max(fits, MIN_ERROR_GROUPS) >= len(names):
            return [[name] for name in names]
        size = -(-len(names) // max(fits, MIN_ERROR_GROUPS))
        log.info("sensitivity: probe errors measured for runs of %d consecutive ops: one candidate per op "
                 "would exceed the probe's budget", size)
        return [names[i:i + size] for i in range(0, len(names), size)]

    def _candidates_left(self) -> int | None:
        """Candidates the probe's budget still affords, the profile's latency measurements (one per
        op type and all INT8, each building a candidate too) kept back; None: no budget."""
        return self.probe.affordable(reserve=len({op.op_type for op in self.space.ops}) + 1)

    def _latency_groups(self, names: list[str], types: dict[str, str]) -> list[list[str]]:
        """Each op alone if the probe's budget affords a latency measurement per op, else one
        group per op type (their measured saving split evenly), as many types as it affords, those
        with the most ops first, the others together (all INT8 takes a measurement too, in each pass)."""
        fits = self.probe.affordable(latency=True)
        groups = None if fits is None else fits - -(-fits // MEASURED_TOGETHER)  # each pass: all INT8 and the rest
        if groups is None or groups >= len(names):
            return [[name] for name in names]
        by_type: dict[str, list[str]] = {}
        for name in names:
            by_type.setdefault(types[name], []).append(name)
        ranked = sorted(by_type, key=lambda t: -len(by_type[t]))  # stable: the first seen first on ties
        kept = ranked if groups >= len(ranked) else ranked[:max(groups - 1, 0)]
        rest = [name for name in names if types[name] not in kept]
        if not kept:
            log.info("sensitivity: latency costs: all INT8's saving split evenly over the %d ops: one measurement "
                     "per op type would exceed the probe's budget", len(names))
            return [names]
        log.info("sensitivity: latency costs measured per op type (%s%s): one per op would exceed the probe's "
                 "budget", ", ".join(kept), f", the other {len(rest)} ops together" if rest else "")
        return [by_type[t] for t in kept] + ([rest] if rest else [])

    def table(self) -> pd.DataFrame | None:
        """Every profile's ranking, the main one first (approach column: which one)."""
        if not self.profiles:
            return None
        return pd.DataFrame([
            {"rank": i + 1, "op": r.op, "op_type": r.op_type, "sensitivity": r.score,
             "latency_cost": r.latency_cost, "measure": f"{self.options.measure} ({self.probe.kind})",
             "calibration": profile.reference.calibration or "", "approach": profile.reference.approach}
            for profile in self.profiles.values() for i, r in enumerate(profile.ranking)
        ])

    # --- the search ----------------------------------------------------------------------------------
    def propose(self, space: Space, trials: Sequence[optuna.trial.FrozenTrial]) -> QuantConfig:
        self.plan()
        tried = tried_keys(trials)
        measured = _measured(trials)
        self.model = LossModel(self.tolerance, [
            Observation(c.describe(), error, m.loss) for c, m in measured
            if (error := self._error(c)) is not None])
        missed = _missed(trials)  # one miss is the loss model's business (it refits); a run of them is not
        self.required = 1.0 - (1.0 - self.options.confidence) / RISK_DECAY ** max(missed - 1, 0)
        if missed > 1:
            log.info("sensitivity: the last %d proposal(s) failed although predicted to pass: the next needs a %.2f "
                     "chance", missed, self.required)
        for c, m in measured:  # an all-INT8 trial measured its family's latency (the default: the first)
            if not c.fp32_ops:
                self.family_latency.setdefault(_family(c), _rounded(m.latency_ratio))
        passing = [(c, m.latency_ratio) for c, m in measured if m.passed]
        self._measured = measured
        if passing:  # a faster pass is sought (objective latency, or a pass slower than FP32): the
            self.profile()  # candidates need the latency model, measured once
        self._fit_offsets()
        # the fastest pass as measured; a candidate must be predicted faster by more than the drift
        # between two measurements of one model (noise must not buy a trial)
        fastest = min((ratio for _, ratio in passing), default=None)
        bound = fastest * (1 - DRIFT) if fastest is not None else None
        chosen = self._choose(space, tried, bound, beat_fp32=fastest is not None and fastest >= 1.0)
        if chosen is not None:
            log.info("sensitivity: next %s, FP32 ops %s: predicted loss %.3g, chance to pass %.2f, latency +%.3f "
                     "(%s)", chosen.config.describe(), sorted(chosen.config.fp32_ops) or "none",
                     chosen.prediction.loss, chosen.prediction.p_pass, chosen.latency, self.model.describe())
            return chosen.config
        if passing:
            raise SearchExhausted("no untried candidate is predicted faster than the fastest pass and likely to pass")
        for config in grid(space):  # nothing the model trusts is left: the rest of the space, fastest first
            config = space.canonical(config)
            if config.key() not in tried and self._error(config) is not None:  # skip what cannot be built
                return config
        raise SearchExhausted(f"all {space.size()} candidates of the space were tried")

    def _choose(self, space: Space, tried: set[str], bound: float | None, beat_fp32: bool) -> _Candidate | None:
        """The fastest likely-to-pass untried candidate, probed exactly (None if there is none).
        ``beat_fp32``: the fastest pass is slower than FP32; where no candidate of the approaches
        profiled so far is predicted faster than FP32, the others are profiled too."""
        knob_only = self.screen.configs
        if len(space.approaches) > 1 and not self.approach_latency:
            self._measure_approaches(space)
        fastest = min(self.family_latency.values(), default=0.0)
        families = {_family(c) for c in knob_only}
        for attempt in range(EXACT_PROBES + 1):
            pool = self._score(knob_only + self._fallbacks(space, tried), tried, bound)
            if not self.profiles and (not pool or min(c.latency for c in pool) > fastest):  # a fallback may be faster
                self._profile(self._best_knobs(space, self._first_approach(space)))
                pool = self._score(knob_only + self._fallbacks(space, tried), tried, bound)
            if beat_fp32 and all(c.latency >= 1.0 for c in pool) and self._unprofiled(space):
                self.profile_all()
                pool = self._score(knob_only + self._fallbacks(space, tried), tried, bound)
            if not pool:
                return None
            last = attempt == EXACT_PROBES  # probed enough: a candidate probed exactly, where one is likely to pass
            best = min([c for c in pool if c.exact] if last and any(c.exact for c in pool) else pool,
                       key=lambda c: (c.latency, len(c.config.fp32_ops), -c.prediction.p_pass))
            if _family(best.config) not in self.family_latency and len(families) > 1 and not last:
                self._measure_family(best.config)  # its kernels' speed, then choose again
                continue
            if best.exact or last:
                return best
            self._probe_exactly(best)  # then choose again
        return None  # unreachable: the last attempt returns

    def _measure_family(self, config: QuantConfig) -> None:
        """The all-INT8 latency of the config's kernel family, measured at its knob setting."""
        self.family_latency[_family(config)] = self._int8_latency(replace(config, fp32_ops=frozenset()))
        log.info("sensitivity: all-INT8 latency of %s: %.3f", _family(config), self.family_latency[_family(config)])

    def _int8_latency(self, config: QuantConfig) -> float:
        """An all-INT8 candidate's measured latency ratio, rounded (1.0 if it cannot be built: no saving)."""
        latency = self._measured_latency(self.space.canonical(config))
        return _rounded(latency.ratio) if latency is not None else 1.0

    def _measure_approaches(self, space: Space) -> None:
        """Latency of each approach's default all-INT8 candidate (static and dynamic differ a lot)."""
        firsts: dict[str, QuantConfig] = {}
        for config in space.knob_configs():
            if config.approach not in self.approach_latency:
                firsts.setdefault(config.approach, config)
        self._measure_together(list(firsts.values()))
        for config in firsts.values():
            self.approach_latency[config.approach] = self._int8_latency(config)
            self.family_latency.setdefault(_family(config), self.approach_latency[config.approach])
            if self._saving(config) > 0:
                self.paying.add(config.approach)
        log.info("sensitivity: all-INT8 latency by approach: %s",
                 ", ".join(f"{a} {r:.3f}" for a, r in self.approach_latency.items()))

    def _fit_offsets(self) -> None:
        """Per approach, how much slower than predicted its measured fallback trials ran (the mean
        difference, rounded): per-op costs, each measured from all INT8, need not add up (falling
        two neighbours back may pay a quantize between them). All-INT8 candidates are measured, not
        predicted, and take none."""
        errors: dict[str, list[float]] = {}
        for config, m in self._measured:
            if config.fp32_ops and config.approach in self.profiles:
                errors.setdefault(config.approach, []).append(m.latency_ratio - self._latency(config, offset=False))
        offsets = {a: _rounded(sum(e) / len(e)) for a, e in errors.items()}
        if offsets != self.offsets:
            log.info("sensitivity: measured fallbacks ran %s their predicted latency: predictions corrected",
                     ", ".join(f"{o:+.3f} ({a}, {len(errors[a])} trial(s))" for a, o in offsets.items()))
        self.offsets = offsets

    def _first_approach(self, space: Space) -> str:
        """The approach profiled first: the fastest known faster than FP32; where none is, the one
        that quantizes the most ops: its per-type latency costs may still find the op types whose
        INT8 pays (static MobileViT on ONNX Runtime: 1.2x FP32 all INT8, 0.97x with only the
        MatMuls INT8; dynamic, MatMuls only: 1.0x)."""
        paying = [a for a in space.approaches if a in self.paying]
        return (min(paying, key=lambda a: self.approach_latency.get(a, 0.0)) if paying
                else max(space.approaches, key=lambda a: len(space.tunable_ops(a))))

    def _best_knobs(self, space: Space, approach: str) -> QuantConfig:
        """The approach's all-INT8 knob setting with the best chance to pass."""
        self._screen()
        errors = self._knob_scores()  # probed settings only: the profile is measured at a real one
        configs = [c for c in self.screen.configs if c.approach == approach]
        buildable = [c for c in configs if errors.get(c.key()) is not None] or configs
        return max(buildable, key=lambda c: self.model.predict(c.describe(), errors.get(c.key()) or 0.0).p_pass)

    def _fallbacks(self, space: Space, tried: set[str]) -> list[QuantConfig]:
        """Of every approach profiled: ranked prefixes at the best knob settings, and one-op changes
        of every tried candidate; each also with every op whose INT8 was measured slower than FP32 in FP32."""
        return [c for profile in self.profiles.values() for c in self._profile_fallbacks(space, tried, profile)]

    def _profile_fallbacks(self, space: Space, tried: set[str], profile: _Profile) -> list[QuantConfig]:
        approach = profile.reference.approach
        ranked = [r.op for r in profile.ranking]
        # the same ops by error share per latency cost (a greedy knapsack): where a dear op ranks
        # high, the cheap ones after it may close the gap for less
        thrifty = [r.op for r in sorted(profile.ranking, key=lambda r: -r.score / max(r.latency_cost, COST_RESOLUTION))]
        slower = frozenset(r.op for r in profile.ranking if r.latency_cost < 0)
        knobs = sorted((c for c in self.screen.configs if c.approach == approach),
                       key=lambda c: -self.model.predict(c.describe(), self._knob_error(c) or float("inf")).p_pass)
        configs = [replace(k, fp32_ops=frozenset(order[:n])) for k in knobs[:TOP_KNOBS] for order in (ranked, thrifty)
                   for n in range(0 if slower else 1, len(ranked) + 1)]
        for key in sorted(tried):
            config = QuantConfig.from_dict(json.loads(key))
            if config.approach != approach:
                continue
            configs += [replace(config, fp32_ops=config.fp32_ops ^ {op}) for op in ranked]
        if slower:
            configs += [replace(c, fp32_ops=c.fp32_ops | slower) for c in configs]
        if "bf16" in space.fallbacks:  # each fallback set also with its BF16-faster ops in BF16
            configs += [replace(c, fallback="bf16") for c in configs]
        return [space.canonical(c) for c in configs]

    def _score(self, configs: list[QuantConfig], tried: set[str], bound: float | None) -> list[_Candidate]:
        """Untried, buildable candidates likely to pass (and, with a bound, predicted faster than it)."""
        pool, seen = [], set()
        for config in configs:
            key = config.key()
            if key in tried or key in seen:
                continue
            seen.add(key)
            error = self._predicted_error(config)
            if error is None:
                continue
            exact = self.probe.known(config) is not None
            prediction = self.model.predict(config.describe(), error)
            latency = self._latency(config)
            if prediction.p_pass >= self.required and (bound is None or latency < bound - 1e-9):
                pool.append(_Candidate(config, latency, error, exact, prediction))
        return pool

    def _predicted_error(self, config: QuantConfig) -> float | None:
        """Knob setting's all-INT8 error times the share of the probe error of the ops still INT8,
        raised to the power that the fallbacks probed exactly so far show (1 before any)."""
        known = self.probe.known(config)
        if known is not None:
            return known.error
        base = self._knob_error(config)
        profile = self._profile_of(config)
        if not config.fp32_ops or base is None or profile is None:
            return base
        share, g = _share_left(config, profile), self._share_exponent()
        below, above = self._anchors(config, profile)
        if below is not None and above is not None and below[0] > above[0] > 0:  # between two: interpolated
            t = math.log(max(share, TINY) / below[0]) / math.log(above[0] / below[0])
            return math.exp((1 - t) * math.log(max(below[1], TINY)) + t * math.log(max(above[1], TINY)))
        if below is not None and below[0] > 0:  # from the nearest fallback it extends
            return below[1] * (share / below[0]) ** g
        return base * share**g

    def _anchors(self, config: QuantConfig, profile: _Profile) -> tuple[_Point | None, _Point | None]:
        """(share left INT8, exact error) of the fallbacks probed exactly at the config's knob
        setting that it extends (the one with the most FP32 ops) and that extend it (the fewest)."""
        knobs = replace(config, fp32_ops=frozenset())
        below: _Point | None = None
        above: _Point | None = None
        for other, error in self.exact_fallbacks:
            if replace(other, fp32_ops=frozenset()) != knobs:
                continue
            point = (_share_left(other, profile), error)
            if other.fp32_ops < config.fp32_ops and (below is None or point[0] < below[0]):
                below = point
            elif other.fp32_ops > config.fp32_ops and (above is None or point[0] > above[0]):
                above = point
        return below, above

    def _probe_exactly(self, candidate: _Candidate) -> None:
        """Probe a predicted candidate; for a fallback, remember its error against the prediction's terms."""
        config = candidate.config
        exact, base, profile = self._error(config), self._knob_error(config), self._profile_of(config)
        share = _share_left(config, profile) if profile is not None else 1.0
        if config.fp32_ops and exact is not None:
            self.exact_fallbacks.append((config, exact))
        if config.fp32_ops and exact and base and 0 < share < 1:
            self.fallback_errors.append((math.log(share), math.log(exact / base)))
            log.info("sensitivity: fallbacks probed exactly keep knob error x share^%.2f of the ops left INT8 (fitted "
                     "to %d): predictions corrected", self._share_exponent(), len(self.fallback_errors))

    def _share_exponent(self) -> float:
        """g in "a fallback's error = its knob setting's error x share^g", fitted to the fallbacks
        probed exactly (least squares in log space through the all-INT8 point, the prior g = 1
        weighing as one fallback keeping a share of 1/e): error shares measured one op, or one run
        of ops, at a time need not add up (quadratic errors fall faster, a damage no fallback of
        these ops removes slower), kept within [0, 4]."""
        sxy = sum(x * y for x, y in self.fallback_errors)
        sxx = sum(x * x for x, _ in self.fallback_errors)
        return min(max((sxy + SHARE_PRIOR) / (sxx + SHARE_PRIOR), 0.0), 4.0)

    def _profile_of(self, config: QuantConfig) -> _Profile | None:
        """The profile of the config's approach; else the main one (its error shares are all there is)."""
        return self.profiles.get(config.approach) or next(iter(self.profiles.values()), None)

    def _latency(self, config: QuantConfig, offset: bool = True) -> float:
        """Predicted: the all-INT8 latency of its kernel family (else of its approach's default)
        plus each FP32 op's cost (from that approach's profile; 0 where it has none); a BF16
        fallback's cost is scaled by its measured BF16/FP32 ratio (as if its INT8 time were small
        beside FP32's); with ``offset``, a fallback's corrected by its approach's measured ones."""
        profile = self.profiles.get(config.approach)
        costs = {r.op: r.latency_cost for r in profile.ranking} if profile is not None else {}
        bf16 = self.bf16_ratios if config.fallback == "bf16" else {}
        int8 = self.family_latency.get(_family(config), self.approach_latency.get(config.approach, 0.0))
        correction = self.offsets.get(config.approach, 0.0) if offset and config.fp32_ops else 0.0
        return int8 + correction + sum(costs.get(op, 0.0) * bf16.get(op, 1.0) for op in config.fp32_ops)


def _share_left(config: QuantConfig, profile: _Profile) -> float:
    """The share of the profile's probe error that the config's INT8 ops carry."""
    return sum(r.score for r in profile.ranking if r.op not in config.fp32_ops)


def _latency_costs(savings: dict[str, float], together: float) -> dict[str, float]:
    """Each op's share of FP32 latency that its INT8 saves (negative: falling it back is faster).
    The costs are marginal, each measured from all INT8, so they need not add up to what all INT8
    saves. Where they add up to more, they are kept: each fallback pays a quantize and a dequantize
    at its edges, and the candidates that matter fall back few ops. Where less (gains too small to
    measure one op at a time), the gains are scaled up to it, so the all-FP32 candidate is
    predicted at FP32's latency; where all INT8 saves but no fallback was measured to cost, the
    saving is split evenly over the ops whose measurement could not tell. Where all INT8 loses,
    the losses are scaled to add up, with the gains, to what it loses."""
    losses = sum(min(s, 0.0) for s in savings.values())
    gains = sum(max(s, 0.0) for s in savings.values())
    undecided = [n for n, s in savings.items() if s == 0]
    if together >= 0 and gains > 0:
        scale = max((together - losses) / gains, 1.0)
        return {n: s * scale if s > 0 else s for n, s in savings.items()}
    if together >= 0 and undecided:
        return {n: (together - losses) / len(undecided) if s == 0 else s for n, s in savings.items()}
    if together < 0 and losses < 0:
        scale = (together - gains) / losses
        return {n: s * scale if s < 0 else s for n, s in savings.items()}
    return dict(savings)  # each op gains alone, all together lose: the measurements disagree


def _difference(measured: LatencyRatio | None, reference: LatencyRatio | None) -> float:
    """``measured``'s ratio minus ``reference``'s where the two differ beyond their intervals and
    beyond DRIFT of the reference, else 0 (noise must not make a cost; nor a candidate that could
    not be built)."""
    if measured is None or reference is None or not measured.apart_from(reference):
        return 0.0
    difference = measured.ratio - reference.ratio
    return difference if abs(difference) > DRIFT * reference.ratio else 0.0


def _rounded(ratio: float) -> float:
    """A measured latency share, rounded to COST_RESOLUTION: noise must not reorder candidates."""
    return round(ratio / COST_RESOLUTION) * COST_RESOLUTION


def _family(config: QuantConfig) -> str:
    """The kernels a candidate runs: its approach, activation scheme and weight granularity."""
    return "/".join(str(k) for k in (config.approach, config.scheme, config.granularity) if k is not None)


def _missed(trials: Sequence[optuna.trial.FrozenTrial]) -> int:
    """How many of the latest evaluated trials failed in a row, the first (the default, which no
    prediction chose) not counted: the winner's curse of choosing the candidate whose probe error
    happens to be luckiest makes near misses come in runs."""
    evaluated = [t for t in records(trials) if t.evaluated]
    streak = 0
    for t in reversed(evaluated[1:]):
        if t.passed:
            break
        streak += 1
    return streak


def _measured(trials: Sequence[optuna.trial.FrozenTrial]) -> list[tuple[QuantConfig, Measurement]]:
    """(config, measurement) of every evaluated trial, duplicates once."""
    return [(t.config, t.measurement) for t in measured_by_key(records(trials)).values()
            if t.config is not None and t.measurement is not None]
