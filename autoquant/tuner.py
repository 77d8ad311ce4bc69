"""The accuracy-driven tuning loop."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import optuna

from autoquant.adapters import Adapter, adapter_class, adapter_for
from autoquant.criterion import DEFAULT_CRITERION, AccuracyCriterion
from autoquant.errors import AutoquantError, ConfigError, EvalFunctionError, unknown_choice
from autoquant.latency import measure_latency
from autoquant.probe import OutputProbe
from autoquant.report import describe_space, history_frame
from autoquant.result import TuneResult
from autoquant.space import QuantConfig, Restriction, Space
from autoquant.strategies import SearchExhausted, Strategy, get_strategy
from autoquant.workers import DEFAULT_GRACE_S, STALE_ATTR, Heartbeat, claimed_by_earlier, fail_stale_trials

log = logging.getLogger("autoquant")

EvalFn = Callable[[Any], float]


class Tuner:
    """Finds the fastest INT8 candidate that meets ``criterion``, stopping at the first that does.

    With ``objective="latency"`` it goes on after the first pass, within ``max_trials`` and
    ``timeout``, and returns the fastest passing candidate by measured latency ratio.

    Every trial is recorded in an Optuna study (in memory unless ``storage`` is given), so a job
    that fails half-way keeps what it finished, and a job run again on the same storage and
    ``study_name`` continues it.

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
        latency_budget_s: float = 0.25,
        objective: str = "accuracy",
        stats_cache: str | Path | None = None,
        on_trial: Callable[[optuna.Study, optuna.trial.FrozenTrial], None] | None = None,
        stale_after_s: float = DEFAULT_GRACE_S,
    ) -> None:
        if max_trials < 1:
            raise ConfigError(f"max_trials must be at least 1, got {max_trials}.")
        if timeout is not None and timeout <= 0:
            raise ConfigError(f"timeout must be a positive number of seconds or None, got {timeout}.")
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
        self.latency_budget_s = latency_budget_s
        # Durable and distributed runs: a calibration cache file, a per-trial callback (progress),
        # and how long a RUNNING trial of another host may go without a heartbeat.
        self.stats_cache = Path(stats_cache) if stats_cache is not None else None
        self.on_trial = on_trial
        self.stale_after_s = stale_after_s

    # --- public API ---------------------------------------------------------------------------
    def space(self, model: Any, calib_data: Iterable[Any], *, adapter: str | type[Adapter] | None = None) -> Space:
        """The space the search would explore for this model, after the user's restrictions."""
        return self._space(self._adapter(model, calib_data, adapter))

    def tune(
        self, model: Any, calib_data: Iterable[Any], eval_fn: EvalFn, *, adapter: str | type[Adapter] | None = None
    ) -> TuneResult:
        """Quantize ``model``; ``eval_fn(candidate) -> float`` scores each candidate on the real backend.

        ``adapter`` is picked from the model's type unless named ("fx") or given as an Adapter class.
        """
        start = time.perf_counter()
        backend = self._adapter(model, calib_data, adapter)
        space = self._space(backend)
        log.info("%s", describe_space(space, backend.name))
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(
            storage=self.storage,
            study_name=self.study_name,
            sampler=self.strategy.create_sampler(),
            direction="minimize",
            load_if_exists=True,
        )
        baseline = study.user_attrs.get("baseline")  # measured once per study: resumes and workers agree
        if baseline is None:
            baseline = _evaluate(eval_fn, backend.fp32_model, "the FP32 model")
            study.set_user_attr("baseline", baseline)
        log.info("FP32 baseline: %.6g; goal: %s", baseline, self.criterion.describe())
        self._calibrate(backend)
        self.strategy.setup(space, OutputProbe(backend, space), self.criterion)
        run = _Run(self, backend, space, study, eval_fn, baseline, start)
        run.search()
        return run.result()

    # --- helpers ------------------------------------------------------------------------------
    def _adapter(self, model: Any, calib_data: Iterable[Any], adapter: str | type[Adapter] | None) -> Adapter:
        if adapter is None:
            cls = adapter_for(model)
        else:
            cls = adapter if isinstance(adapter, type) else adapter_class(adapter)
        return cls(model, calib_data)

    def _calibrate(self, backend: Adapter) -> None:
        """Calibrate, or load the statistics cached by an earlier run of the same job."""
        cache = self.stats_cache
        if cache is not None and cache.exists():
            try:
                if backend.load_stats(cache):
                    log.info("Loaded calibration statistics from %s (no recalibration).", cache)
                    return
            except (AutoquantError, OSError, ValueError) as exc:
                log.warning("Ignoring the calibration cache %s: %s", cache, exc)
        backend.calibrate()
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            backend.save_stats(cache)

    def _space(self, backend: Adapter) -> Space:
        return backend.space.restrict(self.restrict) if self.restrict else backend.space


class _Run:
    """One call of ``Tuner.tune``: the loop and its bookkeeping."""

    def __init__(self, tuner: Tuner, backend: Adapter, space: Space, study: optuna.Study,
                 eval_fn: EvalFn, baseline: float, start: float) -> None:
        self.tuner, self.backend, self.space, self.study = tuner, backend, space, study
        self.eval_fn, self.baseline, self.start = eval_fn, baseline, start
        self.criterion = tuner.criterion
        self.fp32_runner = backend.runner(backend.fp32_model)

    def search(self) -> None:
        # Trials a crashed run or worker left RUNNING: marked FAIL and their configs run again.
        retry = [QuantConfig.from_dict(t.user_attrs["config"])
                 for t in fail_stale_trials(self.study, grace_s=self.tuner.stale_after_s) if "config" in t.user_attrs]
        finished = self._finished()
        first = not self.study.trials
        met = any(self._passes(t) for t in finished.values())
        while not (met and self.tuner.objective == "accuracy"):
            finished = self._finished()  # other workers' trials too: stop all once one met the goal
            if self.tuner.objective == "accuracy" and any(self._passes(t) for t in finished.values()):
                log.info("Stopping: another worker met the goal.")
                break
            if self._counted() >= self.tuner.max_trials:
                log.info("Stopping: max_trials=%d reached.", self.tuner.max_trials)
                break
            if self.tuner.timeout is not None and time.perf_counter() - self.start > self.tuner.timeout:
                log.info("Stopping: timeout of %.0f s reached.", self.tuner.timeout)
                break
            try:
                proposal = retry.pop(0) if retry else self._propose(first)
            except SearchExhausted as exc:
                log.info("Stopping: %s.", exc)
                break
            first = False
            if proposal is not None:
                self.study.enqueue_trial(self.space.params(proposal))
            trial = self.study.ask()
            config = self.space.suggest(trial)  # records the parameters (the enqueued ones, if any)
            if proposal is not None:  # a proposal may carry more than the parameters (per-op calibration)
                config = self.space.canonical(proposal)
            with Heartbeat(self.study, trial._trial_id):
                met = self._run_trial(trial, config, finished) or met
            if self.tuner.on_trial is not None:
                self.tuner.on_trial(self.study, self.study.get_trials(deepcopy=False)[trial.number])

    def _counted(self) -> int:
        """Trials towards max_trials: stale ones are re-run, so they do not count twice."""
        return sum(1 for t in self.study.get_trials(deepcopy=False)
                   if not t.user_attrs.get(STALE_ATTR) and "collision_of" not in t.user_attrs)

    def _propose(self, first: bool) -> QuantConfig | None:
        """The first trial of a study is the sensible default whatever the strategy."""
        if first:
            return self.space.default_config()
        return self.tuner.strategy.propose(self.space, self.study.get_trials(deepcopy=False))

    def _run_trial(self, trial: optuna.Trial, config: QuantConfig,
                   finished: dict[str, optuna.trial.FrozenTrial]) -> bool:
        key = config.key()
        trial.set_user_attr("config", config.to_dict())
        trial.set_user_attr("config_key", key)
        if key in finished:  # samplers may propose a point again: reuse its measurement
            earlier = finished[key]
            for name, value in earlier.user_attrs.items():
                if name not in ("config", "config_key"):
                    trial.set_user_attr(name, value)
            trial.set_user_attr("duplicate_of", earlier.number)
            self.study.tell(trial, earlier.value)
            return False
        claimant = claimed_by_earlier(self.study, trial.number, key)
        if claimant is not None:  # another worker picked the same config a moment earlier: leave it to that one
            trial.set_user_attr("collision_of", claimant)
            self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
            return False

        t0 = time.perf_counter()
        try:
            model = self.backend.build(self.space.resolve(config))
        except AutoquantError as exc:  # a config the backend rejects is a failed trial, not a failed job
            log.warning("Trial %d: could not build %s: %s", trial.number, config.describe(), exc)
            trial.set_user_attr("error", str(exc))
            self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
            return False
        t1 = time.perf_counter()
        try:
            accuracy = _evaluate(self.eval_fn, model, f"trial {trial.number} ({config.describe()})")
        except EvalFunctionError as exc:
            trial.set_user_attr("error", str(exc))
            self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
            exc.partial_result = self.result() if self._finished() else None
            exc.args = (f"{exc} {self._kept_message()}",)
            raise
        t2 = time.perf_counter()
        latency = measure_latency(self.fp32_runner, self.backend.runner(model), budget_s=self.tuner.latency_budget_s)
        loss = self.criterion.loss(self.baseline, accuracy)
        passed = self.criterion.passes(self.baseline, accuracy)
        n_fp32 = len(self.space.fp32_ops(config))
        attrs = {
            "accuracy": accuracy,
            "loss": loss,
            "passed": passed,
            "latency_ratio": latency.ratio,
            "latency_ms": latency.candidate_ms,
            "fp32_latency_ms": latency.baseline_ms,
            "n_fp32": n_fp32,
            "build_s": t1 - t0,
            "eval_s": t2 - t1,
        }
        for name, value in attrs.items():
            trial.set_user_attr(name, value)
        frozen = self.study.tell(trial, self._objective(passed, loss, n_fp32))
        finished[key] = frozen
        log.info(
            "trial %3d/%d  %-4s  accuracy %.6g (loss %+.3g)  latency x%.2f  FP32 ops %d/%d  %s",
            trial.number + 1, self.tuner.max_trials, "PASS" if passed else "fail",
            accuracy, loss, latency.ratio, n_fp32, len(self.space.ops), config.describe(),
        )
        return passed

    def _objective(self, passed: bool, loss: float, n_fp32: int) -> float:
        """What samplers minimise: passing candidates (by FP32 share) before failing ones (by loss).

        Deterministic given eval_fn (latency is noisy), so the same seed gives the same sequence.
        """
        if passed:
            return n_fp32 / max(len(self.space.ops), 1)
        tolerance = self.criterion.tolerance
        return 1.0 + (loss / tolerance if tolerance > 0 else loss)

    def _passes(self, trial: optuna.trial.FrozenTrial) -> bool:
        return self.criterion.passes(self.baseline, trial.user_attrs["accuracy"])

    def _finished(self) -> dict[str, optuna.trial.FrozenTrial]:
        """Evaluated trials by config key (the first of each config)."""
        finished: dict[str, optuna.trial.FrozenTrial] = {}
        for t in self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
            if "accuracy" in t.user_attrs:
                finished.setdefault(t.user_attrs["config_key"], t)
        return finished

    def _best(self) -> optuna.trial.FrozenTrial:
        best = best_trial(list(self._finished().values()), self.baseline, self.criterion)
        if best is None:
            raise AutoquantError(
                "No candidate could be built or evaluated, so there is no result: see the warnings above "
                "for each trial's error."
            )
        return best

    def _kept_message(self) -> str:
        n = len(self._finished())
        where = f"study '{self.study.study_name}'" if self.tuner.storage else "the in-memory study"
        return f"The {n} finished trial(s) are kept in {where} and in this error's partial_result."

    def result(self) -> TuneResult:
        best = self._best()
        config = self.space.resolve(self.space.validate(QuantConfig.from_dict(best.user_attrs["config"])))
        met = self._passes(best)
        elapsed = time.perf_counter() - self.start
        trials = self.study.get_trials(deepcopy=False)
        if not met:
            log.warning(
                "The goal (%s) was NOT met in %d trial(s). Returning the most accurate candidate (trial %d, "
                "loss %+.4g). Try more trials, another strategy, or a looser tolerance.",
                self.criterion.describe(), len(self.study.trials), best.number, best.user_attrs["loss"],
            )
        return TuneResult(
            model=self.backend.result_model(self.backend.build(config)),
            config=config,
            met=met,
            accuracy=best.user_attrs["accuracy"],
            baseline_accuracy=self.baseline,
            loss=self.criterion.loss(self.baseline, best.user_attrs["accuracy"]),
            latency_ratio=best.user_attrs["latency_ratio"],
            fp32_ops=sorted(config.fp32_ops),
            quantizable_ops=len(self.space.ops),
            trials=len(trials),
            evaluations=sum(1 for t in trials if "accuracy" in t.user_attrs and "duplicate_of" not in t.user_attrs),
            elapsed_s=elapsed,
            criterion=self.criterion,
            adapter=self.backend,
            history=history_frame(trials),
            best_trial=best.number,
            sensitivity=self.tuner.strategy.sensitivity,
            probe_cost=self._probe_cost(),
        )

    def _probe_cost(self) -> str:
        cost = self.tuner.strategy.probe_cost
        if cost:
            log.info("Output probe (no eval_fn): %s.", cost)
        return cost


def best_trial(trials: Iterable[optuna.trial.FrozenTrial], baseline: float | None,
               criterion: AccuracyCriterion) -> optuna.trial.FrozenTrial | None:
    """The result among measured trials: the fastest that passes, else the most accurate (None if none)."""
    trials = list(trials)
    if not trials or baseline is None:
        return None
    passing = [t for t in trials if criterion.passes(baseline, t.user_attrs["accuracy"])]
    if passing:
        return min(passing, key=lambda t: (t.user_attrs["latency_ratio"], t.number))
    return min(trials, key=lambda t: (criterion.loss(baseline, t.user_attrs["accuracy"]),
                                      t.user_attrs["latency_ratio"], t.number))


OBJECTIVES = ("accuracy", "latency")


def _check_objective(objective: str) -> str:
    if objective not in OBJECTIVES:
        raise unknown_choice("objective", objective, OBJECTIVES)
    return objective


def _evaluate(eval_fn: EvalFn, model: Any, what: str) -> float:
    """Call the user's eval_fn and insist on one finite number."""
    try:
        value = eval_fn(model)
    except Exception as exc:
        raise EvalFunctionError(
            f"eval_fn raised {type(exc).__name__}: {exc} (evaluating {what}). Fix eval_fn.") from exc
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise EvalFunctionError(
            f"eval_fn must return one number, got {type(value).__name__} (evaluating {what})."
        ) from None
    if not math.isfinite(value):
        raise EvalFunctionError(
            f"eval_fn returned {value} for {what}; it must return a finite number (check for an empty "
            "evaluation set or a division by zero)."
        )
    return value
