"""A cheap, eval_fn-free signal for strategies: how far a candidate's outputs are from FP32.

The probe runs a candidate on a bounded sample of the calibration batches (the first
``max_batches``, 4 unless set: 256 samples at batch size 64) and compares its outputs with
FP32's with an error that fits the output:

- ``logits`` (one 2-D output, a row per sample): mean KL divergence of the softmax from FP32's, in
  nats; top-1 agreement with FP32 is reported alongside;
- ``embedding`` (outputs of 3 or more dimensions, or named so): mean cosine distance of the
  vectors along the last axis;
- ``relative``: relative squared error ||y - y_fp32||^2 / ||y_fp32||^2 over every output.

``kind="auto"`` picks by shape as listed. Every candidate is built and run once (cached by its
canonical key); ``cost`` says how many builds and model runs the probe made and how long they took.

The cost is bounded: given the time of one ``eval_fn`` call, the probe's budget is
``budget_evals`` (2) such calls, and never under ``min_budget_s`` (10 s: below that the probe's
cost does not matter, and a tiny eval_fn must not starve it). A strategy announces how many candidates it will score
(``plan``) and the probe fits them in: each runs on fewer calibration batches (at least one),
chosen once from the FP32 model's time on the first batch and the time of one build (the
default candidate's), so every score uses the same sample; FP32 runs on the other batches only
if they fit.
``on_score(done, total)`` is told each time a candidate is scored, ``total`` counting those a
strategy announced with ``expect`` (the tuner's progress display).
"""

from __future__ import annotations

import logging
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from autoquant.errors import BackendError, ConfigError, check_choice, first_line
from autoquant.latency import WARMUP_PAIRS, LatencyRatio, measure_ratios, pairs_to_decide
from autoquant.space import QuantConfig, Space

if TYPE_CHECKING:
    from autoquant.adapters import Adapter

KINDS = ("auto", "logits", "embedding", "relative")
# (config, fp32 runner, candidate runner) -> the candidate's latency over FP32's
LatencyFn = Callable[[QuantConfig, Callable[[], object], Callable[[], object]], LatencyRatio]
DEFAULT_MAX_BATCHES = 4
RUNS_PER_LATENCY = 2 * pairs_to_decide(0.95)  # model runs of one latency measurement: enough pairs to tell
# candidates timed in one pass, sharing FP32's runs (each kept built meanwhile: a bound on memory)
MEASURED_TOGETHER = 4


@dataclass(frozen=True)
class ProbeScore:
    """One candidate against FP32: ``error`` is the kind's measure (0 = identical outputs)."""

    error: float
    kind: str
    top1_agreement: float | None = None  # logits only: share of samples whose argmax matches FP32


@dataclass
class ProbeCost:
    """What the probe spent: candidates built, model runs (batches), latency measurements, seconds."""

    builds: int = 0
    runs: int = 0
    latency_measurements: int = 0
    seconds: float = 0.0
    batches: int = 0  # calibration batches each candidate runs on
    samples: int = 0  # samples in those batches
    budget_s: float | None = None  # what the probe may spend (None: no eval_fn time known, no bound)

    def describe(self) -> str:
        budget = "" if self.budget_s is None else (
            f" (budget {self.budget_s:.1f} s)" if self.seconds <= self.budget_s else
            f" (OVER its budget of {self.budget_s:.1f} s: the fewest candidates a ranking needs took longer)")
        return (f"{self.builds} candidates built, {self.runs} model runs on {self.batches} calibration batch(es) "
                f"({self.samples} samples), {self.latency_measurements} latency measurements, "
                f"{self.seconds:.1f} s{budget}")


log = logging.getLogger("autoquant")


class OutputProbe:
    """Scores candidates by their outputs on calibration batches, without the user's eval_fn."""

    def __init__(self, adapter: Adapter, space: Space, *, kind: str = "auto",
                 max_batches: int = DEFAULT_MAX_BATCHES, eval_seconds: float | None = None,
                 budget_evals: float = 2.0, min_budget_s: float = 10.0,
                 on_score: Callable[[int, int | None], None] | None = None,
                 latency_fn: LatencyFn | None = None) -> None:
        check_choice("probe output kind", kind, KINDS)
        if max_batches < 1:
            raise ConfigError(f"The probe needs at least one calibration batch, got max_batches={max_batches}.")
        self._adapter, self._space = adapter, space
        self.kind, self.max_batches = kind, max_batches
        self.eval_seconds, self.budget_evals, self.min_budget_s = eval_seconds, budget_evals, min_budget_s
        self._reference: list[list[np.ndarray]] | None = None  # FP32's outputs, per batch
        self._batches = max_batches  # calibration batches a candidate runs on (the plan may cut them)
        self._complete = False  # the reference covers them all (until then: the first batch only)
        self._batch_seconds = 0.0  # the FP32 model's time per calibration batch (its first)
        self._score_seconds: list[float] = []  # each scored candidate's build and runs
        self._latency_seconds: list[float] = []  # each latency measurement's build and runs
        self._build_seconds = 0.0  # one build, timed by the plan
        self._planned = False
        self._scores: dict[str, ProbeScore] = {}
        self._latencies: dict[str, tuple[LatencyRatio, float]] = {}  # by canonical key: (ratio, budget_s)
        self._last: tuple[tuple[str, bool], Any] | None = None  # (key, built to be timed), model
        self.cost = ProbeCost()
        self.failures: dict[str, str] = {}  # config key -> why the backend could not build or run it
        self._on_score, self._expected = on_score, set[str]()
        self._latency_fn = latency_fn  # the tuner's: a known latency model replaces the measurement

    @property
    def calls(self) -> int:
        """Candidates scored (each built and run once)."""
        return len(self._scores)

    # --- outputs ---------------------------------------------------------------------------------
    def _outputs(self, model: Any, batches: int | None = None, skip: int = 0) -> list[list[np.ndarray]]:
        """Per calibration batch, the model's output arrays (shapes kept): on the first ``batches``
        (those a candidate runs on unless given), the first ``skip`` of them left out."""
        runs = self._adapter.batch_runners(model, batches or self._batches)[skip:]
        self.cost.runs += len(runs)
        return [output_arrays(run()) for run in runs]

    def _first_batch(self) -> list[list[np.ndarray]]:
        """FP32's outputs on the first calibration batch (run twice: the second run times a batch)
        and the output kind, before the plan says how many batches a candidate can afford."""
        if self._reference is None:
            start = time.perf_counter()
            self._reference = self._outputs(self._adapter.fp32_model, batches=1)
            if self.kind == "auto":
                self.kind = detect_kind(self._reference[0])
            again = time.perf_counter()  # timed on a second run: a model's first run pays its set-up
            self._outputs(self._adapter.fp32_model, batches=1)
            self._batch_seconds = time.perf_counter() - again
            self.cost.seconds += time.perf_counter() - start
        return self._reference

    def reference(self) -> list[list[np.ndarray]]:
        """FP32's outputs on every batch a candidate runs on (the plan's number, else ``max_batches``)."""
        reference = self._first_batch()
        if not self._complete:
            self._complete = True
            start = time.perf_counter()
            reference += self._outputs(self._adapter.fp32_model, skip=len(reference))
            self.cost.seconds += time.perf_counter() - start
            self._count_samples()
        return reference

    def _count_samples(self) -> None:
        assert self._reference is not None
        self.cost.batches = len(self._reference)
        self.cost.samples = sum(len(batch[0]) if batch[0].ndim else 1 for batch in self._reference)

    # --- the budget ------------------------------------------------------------------------------
    @property
    def budget_s(self) -> float | None:
        return None if self.eval_seconds is None else max(self.budget_evals * self.eval_seconds, self.min_budget_s)

    def plan(self, candidates: int, latency_measurements: int = 0) -> None:
        """About ``candidates`` will be scored and ``latency_measurements`` made: with a budget,
        each candidate runs on as many calibration batches as fit (at least one). Chosen once,
        before the first candidate is scored."""
        if self._planned or self._scores or self.failures:
            return
        self._planned = True
        self._first_batch()
        budget = self.budget_s
        self.cost.budget_s = budget
        if budget is not None and self._batch_seconds > 0:
            self._fit_batches(budget, candidates, latency_measurements)
        self.reference()

    def _fit_batches(self, budget: float, candidates: int, latency_measurements: int) -> None:
        """Cut the batches a candidate runs on to what the budget affords (at least one)."""
        self._time_build()
        # A scored candidate is built and run on its batches (INT8 taken as slow as FP32: a bound);
        # FP32's own runs on the batches after the first count too.
        left = max(budget - self.cost.seconds, 0.0) - latency_measurements * self._latency_estimate()
        n = max(candidates, 1)
        fits = int((left - n * self._build_seconds + self._batch_seconds) / ((n + 1) * self._batch_seconds))
        available = len(self._adapter.batch_runners(self._adapter.fp32_model, self.max_batches))
        if fits < available:
            self._batches = max(fits, 1)
            log.info("probe: %d candidates planned, each on %d calibration batch(es) of %d, to stay within "
                     "%.1f s (%g eval_fn calls)", candidates, self._batches, available, budget, self.budget_evals)

    def _time_build(self) -> None:
        """Time one build, the default candidate's (kept: a strategy scores it first)."""
        start = time.perf_counter()
        try:
            self._build(self._space.canonical(self._space.default_config()))
        except BackendError:  # the search steps past it; the plan goes on without a build time
            pass
        self._build_seconds = time.perf_counter() - start
        self.cost.seconds += self._build_seconds

    def _latency_estimate(self) -> float:
        """Seconds of one latency measurement: as long as the median one took, else a build and its
        runs (warm-up included) at the FP32 model's time per batch."""
        if self._latency_seconds:
            return statistics.median(self._latency_seconds)
        return self._build_seconds + (RUNS_PER_LATENCY + 2 * WARMUP_PAIRS) * self._batch_seconds

    def affordable(self, latency: bool = False, reserve: int = 0) -> int | None:
        """How many more candidates fit in the budget: scored (as long as the median scored candidate
        took) or, with ``latency``, measured for latency; ``reserve`` latency measurements kept back.
        None: no budget."""
        budget = self.budget_s
        if budget is None:
            return None
        scored = statistics.median(self._score_seconds) if self._score_seconds else self._build_seconds
        each = self._latency_estimate() if latency else scored
        left = budget - self.cost.seconds - reserve * self._latency_estimate()
        return sys.maxsize if each <= 0 else max(int(left / each), 0)

    # --- scores ----------------------------------------------------------------------------------
    def score(self, config: QuantConfig) -> ProbeScore:
        """The candidate's distance from FP32 (built and run once per distinct candidate)."""
        config = self._space.canonical(config)
        key = config.key()
        if key not in self._scores:
            reference = self.reference()
            start = time.perf_counter()
            try:
                outputs = self._outputs(self._build(config))
            except BackendError:
                raise
            except Exception as exc:  # a candidate the backend cannot run: not the job's end
                raise self._failed(config, exc) from exc
            finally:
                self.cost.seconds += time.perf_counter() - start
            self._score_seconds.append(time.perf_counter() - start)
            self._scores[key] = compare(self.kind, reference, outputs)
            self._report(key)
        return self._scores[key]

    def expect(self, configs: Iterable[QuantConfig]) -> None:
        """Candidates a strategy is about to score: the progress display counts them in its total."""
        self._expected.update(self._space.canonical(c).key() for c in configs)

    def _report(self, key: str) -> None:
        done = self._scores.keys() | self.failures.keys()
        self._expected.add(key)
        if self._on_score is not None:
            self._on_score(len(done), len(self._expected | done))

    def _build(self, config: QuantConfig, *, timed: bool = False) -> Any:
        """Builds a canonical candidate; the last one is kept, so a second use needs no second build.
        A model only scored is built for its outputs (the adapter may share state between those
        that changes their speed); one to be ``timed`` is built as a result is."""
        key = config.key()
        if key in self.failures:
            raise BackendError(self.failures[key])
        if self._last is None or self._last[0] != (key, timed):
            self._last = None  # free the previous model first
            build = self._adapter.build if timed else self._adapter.build_for_outputs
            try:
                model = build(self._space.resolve(config))
            except Exception as exc:  # a candidate the backend cannot build: not the job's end
                raise self._failed(config, exc) from exc
            self._last = ((key, timed), model)
            self.cost.builds += 1
        return self._last[1]

    def _failed(self, config: QuantConfig, exc: Exception) -> BackendError:
        """Remember (and log once) why ``config`` cannot be probed; the error to raise."""
        self.failures[config.key()] = f"Probe: candidate {config.describe()} failed ({first_line(exc)})"
        log.warning("%s; the search steps past it.", self.failures[config.key()])
        self._report(config.key())
        return BackendError(self.failures[config.key()])

    def known(self, config: QuantConfig) -> ProbeScore | None:
        """The score if this candidate was probed already (nothing is built)."""
        return self._scores.get(self._space.canonical(config).key())

    def error(self, config: QuantConfig) -> float:
        return self.score(config).error

    def latency(self, config: QuantConfig, budget_s: float) -> LatencyRatio:
        """Latency of the candidate over FP32's, interleaved on the adapter's latency batch, until known
        to +-5%, or known faster or slower than FP32, or ``budget_s`` is spent (or ``latency_fn``'s). Measured once per
        candidate, and again only when asked with a larger budget after it could not tell."""
        ratio = self.latencies([config], budget_s)[0]
        if ratio is None:
            raise BackendError(self.failures[self._space.canonical(config).key()])
        return ratio

    def latencies(self, configs: Sequence[QuantConfig], budget_s: float) -> list[LatencyRatio | None]:
        """``latency`` of each candidate (None: the backend could not build it; the probe logged why),
        those not measured yet measured together, MEASURED_TOGETHER at a time, sharing FP32's runs."""
        canonical = [self._space.canonical(c) for c in configs]
        keys = [c.key() for c in canonical]
        todo = [c for c in dict(zip(keys, canonical, strict=True)).values() if self._measures_again(c, budget_s)]
        for i in range(0, len(todo), MEASURED_TOGETHER):
            self._measure(todo[i:i + MEASURED_TOGETHER], budget_s)
        return [self._latencies[k][0] if k in self._latencies else None for k in keys]

    def latencies_in_one_pass(self, configs: Sequence[QuantConfig], budget_s: float) -> list[LatencyRatio | None]:
        """Each candidate measured (again), all in one pass, each to +-5% or over its budget rather
        than only until known faster or slower than FP32: for differences between them. Their
        ratios to FP32 shift from one pass to another (up to 6% measured), more than one op's cost;
        within one pass they share FP32's runs and the load. At most MEASURED_TOGETHER at once."""
        if len(configs) > MEASURED_TOGETHER:
            raise ValueError(f"at most {MEASURED_TOGETHER} candidates are measured in one pass, got {len(configs)}")
        canonical = [self._space.canonical(c) for c in configs]
        self._measure([c for c in canonical if c.key() not in self.failures], budget_s, decide=None)
        return [self._latencies[c.key()][0] if c.key() in self._latencies else None for c in canonical]

    def _measures_again(self, config: QuantConfig, budget_s: float) -> bool:
        known = self._latencies.get(config.key())
        return config.key() not in self.failures and (
            known is None or (not known[0].excludes(1.0) and budget_s > known[1]))

    def _measure(self, configs: list[QuantConfig], budget_s: float, decide: float | None = 1.0) -> None:
        """Builds the candidates (all kept meanwhile) and times them in one pass against FP32."""
        start, adapter = time.perf_counter(), self._adapter
        built: list[tuple[QuantConfig, Any]] = []
        for config in configs:
            try:
                built.append((config, self._build(config, timed=True)))
            except BackendError:  # logged; the others are measured
                continue
        fp32_run = adapter.runner(adapter.fp32_model)
        runs = [adapter.runner(model) for _, model in built]
        if self._latency_fn is not None:
            ratios = [self._latency_fn(config, fp32_run, run) for (config, _), run in zip(built, runs, strict=True)]
        else:
            ratios = measure_ratios(fp32_run, runs, budget_s=budget_s, min_pairs=RUNS_PER_LATENCY // 2, decide=decide)
        for (config, _), ratio in zip(built, ratios, strict=True):
            self._latencies[config.key()] = ratio, budget_s
        elapsed = time.perf_counter() - start
        self.cost.seconds += elapsed
        self.cost.latency_measurements += len(built)
        if built:  # each one's share: what one more measurement costs
            self._latency_seconds += [elapsed / len(built)] * len(built)


# --- errors by output kind ------------------------------------------------------------------------
def detect_kind(arrays: list[np.ndarray]) -> str:
    """logits for one 2-D output with two or more columns; embedding for outputs of 3+ dimensions."""
    if len(arrays) == 1 and arrays[0].ndim == 2 and arrays[0].shape[1] >= 2:
        return "logits"
    if arrays and all(a.ndim >= 3 for a in arrays):
        return "embedding"
    return "relative"


def compare(kind: str, reference: list[list[np.ndarray]], outputs: list[list[np.ndarray]]) -> ProbeScore:
    """``kind``'s error of ``outputs`` against ``reference`` (both: per batch, a list of arrays)."""
    if kind == "logits":
        ref = np.concatenate([batch[0] for batch in reference]).astype(np.float64)
        out = np.concatenate([batch[0] for batch in outputs]).astype(np.float64)
        p_log, q_log = _log_softmax(ref), _log_softmax(out)
        kl = float(np.mean(np.sum(np.exp(p_log) * (p_log - q_log), axis=1)))
        agreement = float(np.mean(ref.argmax(1) == out.argmax(1)))
        return ProbeScore(max(kl, 0.0), kind, agreement)
    if kind == "embedding":  # rows of the last axis, compared by cosine
        ref_rows = np.concatenate([a.reshape(-1, a.shape[-1]) for batch in reference for a in batch]).astype(np.float64)
        out_rows = np.concatenate([a.reshape(-1, a.shape[-1]) for batch in outputs for a in batch]).astype(np.float64)
        norms = np.linalg.norm(ref_rows, axis=1) * np.linalg.norm(out_rows, axis=1)
        cosine = np.sum(ref_rows * out_rows, axis=1) / np.maximum(norms, 1e-30)
        return ProbeScore(float(np.mean(1.0 - cosine)), kind)
    ref = np.concatenate([a.astype(np.float64).ravel() for batch in reference for a in batch])
    out = np.concatenate([a.astype(np.float64).ravel() for batch in outputs for a in batch])
    return ProbeScore(float(np.sum((out - ref) ** 2) / max(float(np.sum(ref**2)), 1e-30)), kind)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


# --- outputs as arrays ------------------------------------------------------------------------------
def output_arrays(outputs: Any) -> list[np.ndarray]:
    """Every tensor or array in a model's outputs (nested lists, tuples or dicts), shapes kept."""
    parts: list[np.ndarray] = []

    def visit(value: Any) -> None:
        if hasattr(value, "detach"):  # a torch tensor; core code does not import torch
            if value.is_floating_point():
                parts.append(value.detach().float().cpu().numpy())
        elif isinstance(value, np.ndarray):
            if np.issubdtype(value.dtype, np.floating):
                parts.append(value)
        elif isinstance(value, Mapping):
            for item in value.values():
                visit(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                visit(item)

    visit(outputs)
    if not parts:
        raise TypeError(f"The model's outputs hold no float tensor or array (got {type(outputs).__name__}).")
    return parts


def flatten_outputs(outputs: Any) -> np.ndarray:
    """Every float in a model's outputs, as one vector."""
    return np.concatenate([a.astype(np.float64, copy=False).ravel() for a in output_arrays(outputs)])
