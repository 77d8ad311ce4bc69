"""One log line after each trial: trials done of the budget, the best so far, elapsed time and an
estimate of the time left (from the mean trial time, capped by the timeout)."""

from __future__ import annotations

import logging
import time

import optuna

from autoquant.criterion import AccuracyCriterion
from autoquant.trials import BASELINE, best_trial, counted, study_records

log = logging.getLogger("autoquant")


class Progress:
    """Called by the tuner after each trial (the CLI and ``tune(verbose=True)`` show its lines)."""

    def __init__(self, max_trials: int, timeout: float | None, criterion: AccuracyCriterion, *,
                 objective: str = "accuracy") -> None:
        self.max_trials, self.timeout, self.criterion, self.objective = max_trials, timeout, criterion, objective
        self.start = time.perf_counter()

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        baseline = study.user_attrs.get(BASELINE)
        trials = study_records(study)
        best = best_trial(trials, baseline, self.criterion)
        elapsed = time.perf_counter() - self.start
        spans = [t.seconds for t in trials if t.measured and t.seconds is not None]
        per_trial = sum(spans) / len(spans) if spans else 0.0
        done = counted(trials)
        m = best.measurement if best is not None else None
        met = m is not None and baseline is not None and self.criterion.passes(baseline, m.accuracy)
        best_text = "no result yet" if best is None or m is None else (
            f"best trial {best.number}: accuracy {m.accuracy:.4g}, latency x{m.latency_ratio:.2f}")
        left = max(self.max_trials - done, 0) * per_trial
        if self.timeout is not None:
            left = min(left, max(self.timeout - elapsed, 0.0))
        if met and m is not None and self.objective == "accuracy" and m.latency_ratio < 1.0:
            left_text = "goal MET"
        elif met:
            goal = "goal met, slower than FP32" if m is not None and m.latency_ratio >= 1.0 else "goal met"
            left_text = f"{goal}; searching for a faster pass, at most ~{left:.0f} s left"
        else:
            left_text = f"goal not met yet; at most ~{left:.0f} s left"
        log.info("progress: %d/%d trials; %s; %s; %.0f s elapsed", done, self.max_trials, best_text, left_text,
                 elapsed)
