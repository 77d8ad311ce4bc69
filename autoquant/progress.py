"""What ``tune`` shows while it runs, by phase: *calibration* (batches done of N), *probe*
(candidates scored of those the strategy has planned, when it probes) and *trials* (done of
max_trials, the best so far and an estimate of the time left, from the mean trial time capped by
the timeout; the estimate ends when the search does).

On a terminal that autoquant writes to alone, a rich progress display with a row per phase, the
log lines printed above it. Elsewhere (CI, a log file, pytest, a caller's own logging handlers),
one log line per trial. ``verbose=False``: nothing. Adapters and the probe report through plain
callbacks (``done`` or ``(done, total)``) and never import rich.

The display never refreshes from a thread: it redraws on each report. A forked child (``isolate``)
therefore never inherits a console lock held mid-draw.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, TextIO

import optuna
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn

from autoquant.criterion import AccuracyCriterion
from autoquant.trials import BASELINE, best_trial, counted, study_records

log = logging.getLogger("autoquant")

PHASES = ("calibration", "probe", "trials")
# A phase's report: how many are done and of how many (None when the count is not known).
Advance = Callable[[int, int | None], None]


@dataclass(frozen=True)
class TrialStatus:
    """Where the trials stand: ``left_s`` is None once the search has stopped."""

    done: int
    max_trials: int
    best: str
    goal: str  # "goal MET", "goal met", "goal met, slower than FP32" or "goal not met yet"
    left_s: float | None
    elapsed_s: float

    def text(self) -> str:
        if self.left_s is None:
            return f"{self.best}; {self.goal}"
        search = "at most" if self.goal == "goal not met yet" else "searching for a faster pass, at most"
        return f"{self.best}; {self.goal}; {search} ~{self.left_s:.0f} s left"

    def line(self) -> str:
        return f"progress: {self.done}/{self.max_trials} trials; {self.text()}; {self.elapsed_s:.0f} s elapsed"

    def stopped(self, reason: str) -> TrialStatus:
        """The final status: no time left to estimate; why the search stopped ("" when it met the goal)."""
        return replace(self, left_s=None, goal=f"{self.goal}; stopped: {reason}" if reason else self.goal)


def trial_status(study: optuna.Study, *, max_trials: int, timeout: float | None, criterion: AccuracyCriterion,
                 objective: str, elapsed_s: float) -> TrialStatus:
    """The trials of ``study`` (every worker's), the best so far and the time left at most."""
    baseline = study.user_attrs.get(BASELINE)
    trials = study_records(study)
    best = best_trial(trials, baseline, criterion)
    m = best.measurement if best is not None else None
    spans = [t.seconds for t in trials if t.measured and t.seconds is not None]
    per_trial = sum(spans) / len(spans) if spans else 0.0
    done = counted(trials)
    estimate = max(max_trials - done, 0) * per_trial
    if timeout is not None:
        estimate = min(estimate, max(timeout - elapsed_s, 0.0))
    left: float | None = estimate
    met = m is not None and baseline is not None and criterion.passes(baseline, m.accuracy)
    if m is None or not met:
        goal = "goal not met yet"
    elif objective == "accuracy" and m.latency_ratio < 1.0:
        goal, left = "goal MET", None  # the search stops here: nothing left to estimate
    else:
        goal = "goal met, slower than FP32" if m.latency_ratio >= 1.0 else "goal met"
    best_text = "no result yet" if best is None or m is None else (
        f"best trial {best.number}: accuracy {m.accuracy:.4g}, latency x{m.latency_ratio:.2f}")
    return TrialStatus(done, max_trials, best_text, goal, left, elapsed_s)


class View:
    """Shows nothing (``verbose=False``); the base of the two views that show something."""

    def update(self, phase: str, done: int, total: int | None, note: str = "") -> None:
        """``phase`` (one of PHASES) has ``done`` of ``total`` steps done."""

    def trial(self, status: TrialStatus) -> None:
        """A trial finished (this worker's; ``status`` counts every worker's)."""

    def stop(self, status: TrialStatus) -> None:
        """The search stopped (``status`` has no time left)."""

    def on(self, phase: str) -> Advance:
        """The callback a step of ``phase`` reports through."""
        return partial(self.update, phase)


class LogLines(View):
    """One log line per trial (the calibration and probe log their own summary lines)."""

    def trial(self, status: TrialStatus) -> None:
        log.info("%s", status.line())


class Bars(View):
    """A rich progress display: a row per phase, in PHASES order, each shown once it starts."""

    def __init__(self, console: Console) -> None:
        self.progress = Progress(
            TextColumn("{task.description:<11}"), BarColumn(bar_width=30), MofNCompleteColumn(),
            TextColumn("{task.fields[note]}"), console=console, auto_refresh=False)
        self.tasks: dict[str, TaskID] = {
            phase: self.progress.add_task(phase, total=None, visible=False, note="") for phase in PHASES}

    def update(self, phase: str, done: int, total: int | None, note: str = "") -> None:
        self.progress.update(self.tasks[phase], completed=done, total=total, visible=True, note=note)
        self.progress.refresh()

    def trial(self, status: TrialStatus) -> None:
        self.update("trials", status.done, status.max_trials, status.text())

    def stop(self, status: TrialStatus) -> None:
        self.trial(status)

    @contextmanager
    def shown(self) -> Iterator[Bars]:
        self.progress.start()  # log lines and prints go above the display while it runs
        try:
            yield self
        finally:
            self.progress.stop()  # the last frame stays on the terminal


class StderrLines(logging.StreamHandler):  # type: ignore[type-arg]
    """Log lines to whatever ``sys.stderr`` is when they are written: above the progress display
    while it runs (rich redirects stderr to print above it), plain stderr otherwise."""

    def __init__(self, fmt: str = "autoquant: %(message)s", datefmt: str | None = None) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter(fmt, datefmt))

    @property  # type: ignore[override]
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:  # StreamHandler.__init__ sets it; sys.stderr is always used
        pass


@contextmanager
def shown(verbose: bool) -> Iterator[View]:
    """The view for one ``tune``. autoquant's INFO lines go to stderr for the call unless the caller
    set up logging (then its handlers decide; its logging is left as it was). The display is drawn
    only on a terminal where autoquant's own handler is the only one writing (another handler's
    lines would break it); otherwise one line per trial."""
    if not verbose:
        yield View()
        return
    with _stderr_lines():
        console = Console(stderr=True)
        if _only_ours() and console.is_terminal and not console.is_dumb_terminal:
            with Bars(console).shown() as bars:
                yield bars
        else:
            yield LogLines()


@contextmanager
def _stderr_lines() -> Iterator[None]:
    logger = logging.getLogger("autoquant")
    if logger.handlers or logging.getLogger().handlers:
        yield
        return
    handler, level = StderrLines(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _only_ours() -> bool:
    handlers = logging.getLogger("autoquant").handlers + logging.getLogger().handlers
    return all(isinstance(h, StderrLines) for h in handlers)
