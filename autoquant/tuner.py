"""The accuracy-driven tuning loop."""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy.exc
from optuna.exceptions import StorageInternalError

from autoquant import progress, stats_cache
from autoquant.adapters import Adapter, adapter_class, adapter_for
from autoquant.criterion import DEFAULT_CRITERION, AccuracyCriterion, metric_step, step_advice
from autoquant.data import batch_count
from autoquant.errors import AutoquantError, ConfigError, first_line, unknown_choice
from autoquant.evaluation import CandidateFailed, EvalFn, evaluate, evaluate_candidate
from autoquant.fingerprint import Fingerprint, fingerprint
from autoquant.latency import LatencyRatio, measure_ratio, pairs_to_decide
from autoquant.probe import LatencyFn, OutputProbe
from autoquant.report import config_text, describe_space, history_frame
from autoquant.result import TuneResult, counts_text
from autoquant.space import QuantConfig, Restriction, Space
from autoquant.strategies import SearchExhausted, Strategy, get_strategy
from autoquant.trials import (
    BASELINE,
    BASELINE_EVAL_S,
    COLLISION_OF,
    CONFIG,
    CONFIG_KEY,
    DUPLICATE_OF,
    ERROR,
    Measurement,
    TrialRecord,
    best_trial,
    check_study,
    counted,
    measured_by_key,
    study_records,
)
from autoquant.workers import (
    DEFAULT_GRACE_S,
    Heartbeat,
    abandon,
    claimed_by_earlier,
    fail_stale_trials,
    start_trial,
    to_rerun,
)

log = logging.getLogger("autoquant")
UNDECIDED_LATENCY_FACTOR = 4  # a latency that cannot tell faster from slower than FP32 is measured this much longer


class TuneInterrupted(AutoquantError):
    """Ctrl-C or SIGTERM stopped ``tune``: the running trial is recorded FAIL (it runs again on the
    next ``tune`` of the same study); ``partial_result`` holds what finished (None if nothing)."""

    def __init__(self, message: str, partial_result: TuneResult | None = None) -> None:
        super().__init__(message)
        self.partial_result = partial_result




class Tuner:
    """Finds the fastest INT8 candidate that meets ``criterion``, stopping at the first that does
    and runs faster than FP32. A passing candidate slower than FP32 does not stop the search: it
    goes on within ``max_trials`` and ``timeout`` for a faster one, returns the fastest passing
    candidate, and says so when none beat FP32 (``TuneResult.slower_than_fp32``).

    With ``objective="latency"`` it goes on after the first pass, within ``max_trials`` and
    ``timeout``, and returns the fastest passing candidate by measured latency ratio.

    Latency is measured against FP32 in interleaved pairs until the ratio is known to
    ``latency_precision`` (0.05: +-5% at 95% confidence) or ``latency_budget_s`` seconds are
    spent (up to 4 times as long while it cannot tell faster from slower than FP32: that decides
    whether a pass ends the search and what the result says); ``latency_fn(config, fp32_run,
    candidate_run) -> LatencyRatio`` replaces that measurement, the probe's too (a seam for tests
    and for a known latency model).

    Every trial is recorded in an Optuna study (in memory unless ``storage`` is given), so a job
    that fails half-way keeps what it finished, and a job run again on the same storage and
    ``study_name`` continues it. The study is tied to a fingerprint of the model and the
    calibration data: a rerun with another model is refused unless ``restart=True`` (which
    deletes the study and the calibration cache and starts over).

    ``trial_timeout`` (seconds, off by default) fails a trial that takes longer; ``isolate=True``
    scores each candidate in a child process (eval_fn runs there, once), so a hang or a crash in
    native code fails that trial only (see ``autoquant.evaluation``).

    >>> tuner = Tuner(AccuracyCriterion(relative=0.01), strategy="random", max_trials=20)
    >>> tuner.max_trials
    20
    """

    def __init__(
        self,
        criterion: AccuracyCriterion | None = None,
        *,
        strategy: str | Strategy = "sensitivity",
        max_trials: int = 50,
        timeout: float | None = None,
        seed: int | None = 0,
        restrict: Restriction | None = None,
        storage: str | optuna.storages.BaseStorage | None = None,
        study_name: str | None = None,
        latency_budget_s: float = 0.5,
        latency_precision: float = 0.05,
        latency_fn: LatencyFn | None = None,
        objective: str = "accuracy",
        stats_cache: str | Path | None = None,
        on_trial: Callable[[optuna.Study, optuna.trial.FrozenTrial], None] | None = None,
        stale_after_s: float = DEFAULT_GRACE_S,
        restart: bool = False,
        trial_timeout: float | None = None,
        isolate: bool = False,
    ) -> None:
        if max_trials < 1:
            raise ConfigError(f"max_trials must be at least 1, got {max_trials}.")
        for name, value in (("timeout", timeout), ("trial_timeout", trial_timeout)):
            if value is not None and value <= 0:
                raise ConfigError(f"{name} must be a positive number of seconds or None, got {value}.")
        self.criterion = criterion or DEFAULT_CRITERION
        self.strategy = get_strategy(strategy, seed=seed)
        # "accuracy": stop at the first passing candidate; "latency": go on within the budget and
        # return the fastest passing one.
        self.objective = _check_objective(objective)
        self.max_trials = max_trials
        self.timeout = timeout
        self.restrict = restrict
        self.storage = storage
        self.study_name = study_name
        if latency_precision <= 0:
            raise ConfigError(f"latency_precision must be positive (0.05: +-5%), got {latency_precision}.")
        self.latency_budget_s = latency_budget_s
        self.latency_precision = latency_precision
        self.latency_fn = latency_fn
        # Durable and distributed runs: a calibration cache file, a per-trial callback (progress),
        # and how long a RUNNING trial of another host may go without a heartbeat.
        self.stats_cache = Path(stats_cache) if stats_cache is not None else None
        self.on_trial = on_trial
        self.stale_after_s = stale_after_s
        self.restart = restart
        self.trial_timeout = trial_timeout
        self.isolate = isolate

    # --- public API ---------------------------------------------------------------------------
    def space(self, model: Any, calib_data: Iterable[Any], *, adapter: str | type[Adapter] | None = None) -> Space:
        """The space the search would explore for this model, after the user's restrictions."""
        return self._space(self._adapter(model, calib_data, adapter))

    def tune(
        self, model: Any, calib_data: Iterable[Any], eval_fn: EvalFn, *, adapter: str | type[Adapter] | None = None,
        verbose: bool = True,
    ) -> TuneResult:
        """Quantize ``model``; ``eval_fn(candidate) -> float`` scores each candidate on the real backend.

        ``adapter`` is picked from the model's type unless named ("fx") or given as an Adapter class.
        With ``verbose`` (the default), progress goes to stderr: on a terminal a display by phase
        (calibration, probe, trials: done of N, best so far, time left) under the log lines (space,
        baseline, each trial, summary); elsewhere, or under the caller's own logging handlers, a line
        per trial. ``verbose=False`` silences it (see ``autoquant.progress``).
        """
        with progress.shown(verbose) as view:
            return self._tune(model, calib_data, eval_fn, adapter, view)

    def _tune(self, model: Any, calib_data: Iterable[Any], eval_fn: EvalFn,
              adapter: str | type[Adapter] | None, view: progress.View) -> TuneResult:
        start = time.perf_counter()
        backend = self._adapter(model, calib_data, adapter)
        space = self._space(backend)
        log.info("%s", describe_space(space, backend.name))
        fp = fingerprint(model, calib_data)
        study = self._study(fp)
        baseline = study.user_attrs.get(BASELINE)  # measured once per study: resumes and workers agree
        if baseline is None:
            t0 = time.perf_counter()
            baseline = evaluate(eval_fn, backend.fp32_model, "the FP32 model")
            study.set_user_attr(BASELINE_EVAL_S, time.perf_counter() - t0)
            study.set_user_attr(BASELINE, baseline)  # last: a study with a baseline has its eval time
        log.info("FP32 baseline: %.6g; goal: %s", baseline, self.criterion.describe())
        self._calibrate(backend, fp, view, batch_count(calib_data))
        probe = OutputProbe(backend, space, eval_seconds=study.user_attrs.get(BASELINE_EVAL_S),
                            on_score=view.on("probe"), latency_fn=self.latency_fn)
        self.strategy.setup(space, probe, self.criterion)
        run = _Run(self, backend, space, study, eval_fn, baseline, start, view)
        with run.signals.installed():
            try:
                run.search()
            except (StorageInternalError, sqlalchemy.exc.OperationalError) as exc:
                raise AutoquantError(
                    f"The study's storage failed ({first_line(exc)}). The finished trials are kept there: once it "
                    "is reachable, run the same job again to continue (a trial left running is run again)."
                ) from exc
        return run.result()

    # --- helpers ------------------------------------------------------------------------------
    def _adapter(self, model: Any, calib_data: Iterable[Any], adapter: str | type[Adapter] | None) -> Adapter:
        if adapter is None:
            cls = adapter_for(model)
        else:
            cls = adapter if isinstance(adapter, type) else adapter_class(adapter)
        return cls(model, calib_data)

    def _study(self, fp: Fingerprint) -> optuna.Study:
        """The job's study, checked against ``fp`` (or deleted first, with ``restart``)."""
        with _quiet_optuna():
            if self.restart and self.storage is not None and self.study_name is not None:
                try:
                    optuna.delete_study(study_name=self.study_name, storage=self.storage)
                    log.info("Restart: deleted study '%s' and its trials.", self.study_name)
                except KeyError:
                    pass
            study = optuna.create_study(storage=self.storage, study_name=self.study_name,
                                        sampler=self.strategy.create_sampler(), direction="minimize",
                                        load_if_exists=True)
        check_study(study, fp)
        return study

    def _calibrate(self, backend: Adapter, fp: Fingerprint, view: progress.View, batches: int | None) -> None:
        """Calibrate, or load the statistics cached by an earlier run of the same job."""
        cache = self.stats_cache
        if cache is not None and self.restart:
            cache.unlink(missing_ok=True)
        if cache is not None and stats_cache.load(backend, cache, fp):
            log.info("Loaded calibration statistics from %s (no recalibration).", cache)
            view.update("calibration", 0, 0, "loaded from the cache")
            return
        backend.calibrate(on_batch=lambda done: view.update("calibration", done, batches))
        if cache is not None:
            stats_cache.save(backend, cache, fp)

    def _space(self, backend: Adapter) -> Space:
        return backend.space.restrict(self.restrict) if self.restrict else backend.space


@contextmanager
def _quiet_optuna() -> Iterator[None]:
    """Optuna's INFO lines ("A new study created...") off, and the caller's setting restored."""
    previous = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(previous)


class _StopSignals:
    """Ctrl-C and SIGTERM stop the search cleanly: during a candidate's build and evaluation they
    interrupt it at once (the trial is then recorded FAIL); anywhere else (storage calls, whose
    interruption would leave a half-written transaction) they are noted and acted on at the next
    trial boundary."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._interruptible = False

    @contextmanager
    def installed(self) -> Iterator[_StopSignals]:
        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            yield self
            return
        previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    @contextmanager
    def interruptible(self) -> Iterator[None]:
        self._interruptible = True
        try:
            if self.received:
                raise KeyboardInterrupt(self.received)
            yield
        finally:
            self._interruptible = False

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        if self._interruptible:
            self._interruptible = False
            raise KeyboardInterrupt(self.received)


class _Run:
    """One call of ``Tuner.tune``: the loop and its bookkeeping."""

    def __init__(self, tuner: Tuner, backend: Adapter, space: Space, study: optuna.Study,
                 eval_fn: EvalFn, baseline: float, start: float, view: progress.View) -> None:
        self.tuner, self.backend, self.space, self.study = tuner, backend, space, study
        self.eval_fn, self.baseline, self.start, self.view = eval_fn, baseline, start, view
        self.criterion = tuner.criterion
        self.fp32_runner = backend.runner(backend.fp32_model)
        self.met_here = False
        self.signals = _StopSignals()
        self.said_slower = False
        self.step: float | None = None

    def search(self) -> None:
        fail_stale_trials(self.study, grace_s=self.tuner.stale_after_s)
        retry = to_rerun(self.study)  # configs a killed or stopped run left unfinished run first
        first = not any(t.config is not None for t in study_records(self.study))
        while (reason := self._stop_reason()) is None:
            try:
                with self.signals.interruptible():  # the probe's ranking may take a while
                    proposal = retry.pop(0) if retry else self._propose(first)
            except SearchExhausted as exc:
                reason = str(exc)
                break
            except KeyboardInterrupt as exc:
                raise self._interrupted(str(exc) or "Ctrl-C") from None
            first = False
            trial = start_trial(self.study, self.space.params(proposal) if proposal is not None else None)
            config = self.space.suggest(trial)  # records the parameters (the proposal's, if any)
            if proposal is not None:  # a proposal may carry more than the parameters (per-op calibration)
                config = self.space.canonical(proposal)
            try:
                with Heartbeat(self.study, trial._trial_id):
                    self._run_trial(trial, config)
            except KeyboardInterrupt as exc:
                how = str(exc) or "Ctrl-C"
                abandon(self.study, trial._trial_id, f"stopped ({how}) while running: it runs again on the next "
                                                     "tune of this study")
                raise self._interrupted(how, trial.number) from None
            frozen = self.study.get_trials(deepcopy=False)[trial.number]
            self.view.trial(self._status())
            if self.tuner.on_trial is not None:
                self.tuner.on_trial(self.study, frozen)
            if self.signals.received:
                raise self._interrupted(self.signals.received)
        self.view.stop(self._status().stopped(reason))
        if reason:
            log.info("Stopping: %s.", reason)

    def _status(self) -> progress.TrialStatus:
        return progress.trial_status(self.study, max_trials=self.tuner.max_trials, timeout=self.tuner.timeout,
                                     criterion=self.criterion, objective=self.tuner.objective,
                                     elapsed_s=time.perf_counter() - self.start)

    def _stop_reason(self) -> str | None:
        """Why the search stops now ("" when this worker just met the goal), or None to go on."""
        trials = study_records(self.study)  # other workers' trials too: stop all once one met the goal
        passing = [t.measurement for t in trials if t.measured and self._passes(t) and t.measurement is not None]
        if self.tuner.objective == "accuracy" and passing:
            fastest = min(passing, key=lambda m: m.latency_ratio)
            if fastest.latency_ratio < 1.0:
                return "" if self.met_here else "another worker met the goal"
            if not self.said_slower:
                self.said_slower = True
                log.info("The goal is met, but at x%.2f the FP32 latency: searching on (within max_trials=%d%s) for a "
                         "passing candidate faster than FP32.", fastest.latency_ratio, self.tuner.max_trials,
                         f", timeout={self.tuner.timeout:g} s" if self.tuner.timeout else "")
        if counted(trials) >= self.tuner.max_trials:
            return f"max_trials={self.tuner.max_trials} reached"
        if self.tuner.timeout is not None and time.perf_counter() - self.start > self.tuner.timeout:
            return f"timeout of {self.tuner.timeout:.0f} s reached"
        return None

    def _propose(self, first: bool) -> QuantConfig | None:
        """The first trial of a study is the sensible default whatever the strategy."""
        if first:
            return self.space.default_config()
        return self.tuner.strategy.propose(self.space, self.study.get_trials(deepcopy=False))

    def _run_trial(self, trial: optuna.Trial, config: QuantConfig) -> None:
        key = config.key()
        trial.set_user_attr(CONFIG, config.to_dict())
        trial.set_user_attr(CONFIG_KEY, key)
        earlier = measured_by_key(study_records(self.study)).get(key)
        if earlier is not None and earlier.measurement is not None:  # samplers may propose a point again
            self._record(trial, earlier.measurement, duplicate_of=earlier.number)
            return
        claimed = claimed_by_earlier(self.study, trial.number, key)
        if claimed is not None:  # another worker picked the same config a moment earlier: leave it to that one
            trial.set_user_attr(COLLISION_OF, claimed)
            self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
            return
        what = f"trial {trial.number} ({config_text(config)})"
        try:
            with self.signals.interruptible():
                scored = evaluate_candidate(
                    lambda: self.backend.build(self.space.resolve(config)), self.eval_fn,
                    lambda model: self._latency(config, model),
                    what, timeout=self.tuner.trial_timeout, isolate=self.tuner.isolate)
        except CandidateFailed as exc:  # a candidate that fails is a failed trial, not a failed job
            log.warning("%s FAILED: %s", what, exc)
            trial.set_user_attr(ERROR, str(exc))
            self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
            return
        n_fp32 = len(self.space.fp32_ops(config))
        measurement = Measurement(
            accuracy=scored.accuracy, loss=self.criterion.loss(self.baseline, scored.accuracy),
            passed=self.criterion.passes(self.baseline, scored.accuracy), latency_ratio=scored.latency.ratio,
            latency_ms=scored.latency.candidate_ms, fp32_latency_ms=scored.latency.baseline_ms, n_fp32=n_fp32,
            build_s=scored.build_s, eval_s=scored.eval_s, latency_precision=scored.latency.half_width,
        )
        self._record(trial, measurement)
        log.info("trial %d (%d/%d)  %-4s  accuracy %.6g (loss %+.3g)  latency x%.2f +-%.0f%%  FP32 ops %d/%d  %s",
                 trial.number, counted(study_records(self.study)), self.tuner.max_trials,
                 "PASS" if measurement.passed else "fail", measurement.accuracy, measurement.loss,
                 measurement.latency_ratio, 100 * scored.latency.half_width, n_fp32, len(self.space.ops),
                 config_text(config))
        if self.step is None:
            self.step = self._metric_step()
            if self.step is not None:
                log.warning("The goal is finer than the metric can tell: %s.",
                            step_advice(self.criterion, self.baseline, self.step))

    def _metric_step(self) -> float | None:
        """The metric's step where it is coarser than the loss the goal allows (None elsewhere)."""
        values = [self.baseline] + [t.measurement.accuracy for t in study_records(self.study) if t.measurement]
        return metric_step(values, below=self.criterion.allowed(self.baseline))

    def _latency(self, config: QuantConfig, model: Any) -> LatencyRatio:
        """The candidate's latency over FP32's, known to the tuner's precision or its time cap."""
        candidate = self.backend.runner(model)
        if self.tuner.latency_fn is not None:
            return self.tuner.latency_fn(config, self.fp32_runner, candidate)
        precision, budget, pairs = self.tuner.latency_precision, self.tuner.latency_budget_s, pairs_to_decide(0.95)
        ratio = measure_ratio(self.fp32_runner, candidate, precision=precision, budget_s=budget, min_pairs=pairs)
        if ratio.excludes(1.0) or ratio.half_width <= precision:
            return ratio
        # faster or slower than FP32 is what ends the search and what the result says: measured longer
        return measure_ratio(self.fp32_runner, candidate, precision=precision,
                             budget_s=UNDECIDED_LATENCY_FACTOR * budget, min_pairs=pairs, decide=1.0)

    def _record(self, trial: optuna.Trial, measurement: Measurement, *, duplicate_of: int | None = None) -> None:
        for name, value in measurement.to_attrs().items():
            trial.set_user_attr(name, value)
        if duplicate_of is not None:
            trial.set_user_attr(DUPLICATE_OF, duplicate_of)
        self.study.tell(trial, self._objective(measurement))
        self.met_here = self.met_here or self.criterion.passes(self.baseline, measurement.accuracy)

    def _objective(self, m: Measurement) -> float:
        """What samplers minimise: passing candidates (by FP32 share) before failing ones (by loss).

        Deterministic given eval_fn (latency is noisy), so the same seed gives the same sequence.
        """
        if m.passed:
            return m.n_fp32 / max(len(self.space.ops), 1)
        tolerance = self.criterion.tolerance
        return 1.0 + (m.loss / tolerance if tolerance > 0 else m.loss)

    def _passes(self, trial: TrialRecord) -> bool:
        return trial.measurement is not None and self.criterion.passes(self.baseline, trial.measurement.accuracy)

    def _interrupted(self, how: str, running: int | None = None) -> TuneInterrupted:
        partial = self.result() if measured_by_key(study_records(self.study)) else None
        where = f"study '{self.study.study_name}'" if self.tuner.storage else "the in-memory study (lost on exit)"
        was = f"trial {running} was running and is recorded FAIL; " if running is not None else ""
        return TuneInterrupted(
            f"Stopped by {how}: {was}the finished trials are kept in {where} and in this error's "
            "partial_result. Run the same job again to continue it.", partial)

    def result(self) -> TuneResult:
        trials = study_records(self.study)
        best = best_trial(trials, self.baseline, self.criterion)
        if best is None or best.config is None or best.measurement is None:
            failed = "; ".join(f"trial {t.number}: {t.error}" for t in trials if t.error)[:2000]
            raise AutoquantError(f"No candidate could be built or evaluated, so there is no result ({failed}).")
        config = self.space.resolve(self.space.validate(best.config))
        m = best.measurement
        met = self.criterion.passes(self.baseline, m.accuracy)
        if not met:
            log.warning(
                "The goal (%s) was NOT met in %d trial(s). Returning the most accurate candidate (trial %d, "
                "loss %+.4g). Try more trials, another strategy, or a looser tolerance.",
                self.criterion.describe(), counted(trials), best.number, m.loss,
            )
        elif m.latency_ratio >= 1.0:
            log.warning("No passing candidate is faster than FP32 (%d trial(s)): the fastest, trial %d, runs at x%.2f "
                        "the FP32 latency. The FP32 model is the faster choice on this backend (more trials may "
                        "find a faster pass).", counted(trials), best.number, m.latency_ratio)
        counts = self.space.op_counts(config)
        log.info("quantized (whole model): %s", counts_text(counts))
        return TuneResult(
            model=self.backend.result_model(self.backend.build(config)),
            config=config,
            met=met,
            accuracy=m.accuracy,
            baseline_accuracy=self.baseline,
            loss=self.criterion.loss(self.baseline, m.accuracy),
            latency_ratio=m.latency_ratio,
            fp32_ops=sorted(config.fp32_ops),
            quantizable_ops=len(self.space.ops),
            trials=counted(trials),
            evaluations=sum(1 for t in trials if t.evaluated),
            elapsed_s=time.perf_counter() - self.start,
            criterion=self.criterion,
            adapter=self.backend,
            history=history_frame(self.study.get_trials(deepcopy=False)),
            best_trial=best.number,
            sensitivity=self.tuner.strategy.sensitivity,
            probe_cost=self._probe_cost(),
            failed_trials={t.number: t.error or "" for t in trials if t.outcome == "FAILED" and t.counts},
            op_counts=counts,
            latency_precision=m.latency_precision,
            metric_step=self._metric_step(),
        )

    def _probe_cost(self) -> str:
        cost = self.tuner.strategy.probe_cost
        if cost:
            log.info("Output probe (no eval_fn): %s.", cost)
        return cost


OBJECTIVES = ("accuracy", "latency")


def _check_objective(objective: str) -> str:
    if objective not in OBJECTIVES:
        raise unknown_choice("objective", objective, OBJECTIVES)
    return objective
