"""Building and scoring one candidate, contained: whatever goes wrong is this candidate's failure.

``evaluate_candidate`` builds a config, measures its latency against FP32 and scores it with the
user's eval_fn. Any error on the way (the backend refuses the config, a kernel raises, eval_fn
returns NaN) becomes ``CandidateFailed`` with the reason, for the tuner to record on the trial.

Two guards, both off by default:

- ``timeout``: a trial that takes longer fails. In the process, an alarm interrupts Python code
  (main thread only); a hang inside native code needs ``isolate``.
- ``isolate``: build and eval_fn run in a forked child process, so a hang is killed at the
  timeout and a crash (a segfault in a backend kernel) kills only the child. The parent keeps the
  child's accuracy and builds the candidate again only to measure its latency and keep the model
  (the child runs single-threaded: a forked OpenMP runtime deadlocks with more threads, so its
  timing would say nothing). eval_fn runs once per candidate either way.
"""

from __future__ import annotations

import math
import multiprocessing
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from autoquant.errors import AutoquantError, EvalFunctionError, first_line
from autoquant.latency import LatencyRatio

EvalFn = Callable[[Any], float]


class CandidateFailed(AutoquantError):
    """One candidate could not be built, scored or run; the message is the reason."""


class _Timeout(BaseException):  # BaseException: eval_fn's own ``except Exception`` must not swallow it
    pass


@dataclass(frozen=True)
class Scored:
    accuracy: float
    latency: LatencyRatio
    build_s: float
    eval_s: float


def evaluate(eval_fn: EvalFn, model: Any, what: str) -> float:
    """Call the user's eval_fn and insist on one finite number."""
    try:
        value = eval_fn(model)
    except Exception as exc:
        raise EvalFunctionError(f"eval_fn raised {type(exc).__name__}: {exc} (evaluating {what}).") from exc
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


def evaluate_candidate(build: Callable[[], Any], eval_fn: EvalFn, latency: Callable[[Any], LatencyRatio], what: str,
                       *, timeout: float | None = None, isolate: bool = False) -> Scored:
    """Build, score and time one candidate; ``CandidateFailed`` with the reason if any step fails."""
    if isolate:
        accuracy, eval_s = _score_in_child(build, eval_fn, what, timeout)
        model, build_s = _timed("could not build it", build)
        return Scored(accuracy, _step("it could not be run", lambda: latency(model)), build_s, eval_s)
    with _alarm(timeout):
        model, build_s = _timed("could not build it", build)
        # timed before eval_fn runs it: a oneDNN INT8 conv keeps one primitive, for the input shape it
        # first ran with, and runs slower on others (x1.25 on a depthwise CNN timed after eval_fn's batches)
        measured = _step("it could not be run", lambda: latency(model))
        accuracy, eval_s = _timed("eval_fn failed on it", lambda: evaluate(eval_fn, model, what))
    return Scored(accuracy, measured, build_s, eval_s)


def _timed(what: str, fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    value = _step(what, fn)
    return value, time.perf_counter() - start


def _step(what: str, fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except _Timeout:
        raise
    except Exception as exc:
        reason = str(exc) if isinstance(exc, EvalFunctionError) else first_line(exc)
        raise CandidateFailed(f"{what}: {reason}") from exc


@contextmanager
def _alarm(timeout: float | None) -> Iterator[None]:
    if timeout is None:
        yield
        return
    if threading.current_thread() is not threading.main_thread():
        raise AutoquantError("trial_timeout needs the main thread (a signal alarm); in a thread, use isolate=True.")

    def expire(signum: int, frame: Any) -> None:
        raise _Timeout

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        yield
    except _Timeout:
        raise CandidateFailed(f"timed out after {timeout:g} s (trial_timeout)") from None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _score_in_child(build: Callable[[], Any], eval_fn: EvalFn, what: str,
                    timeout: float | None) -> tuple[float, float]:
    """Build and score in a forked child: (accuracy, eval_fn seconds); CandidateFailed if it fails,
    hangs past ``timeout`` or dies."""
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_child, args=(send, build, eval_fn, what), daemon=True)
    child.start()
    send.close()
    try:
        if not receive.poll(timeout):
            raise CandidateFailed(f"timed out after {timeout:g} s (trial_timeout; the evaluation process was killed)")
        try:
            outcome = receive.recv()
        except EOFError:  # the child died without a word: a crash in native code
            child.join()
            raise CandidateFailed(f"it crashed the evaluation process ({_exit_text(child.exitcode)})") from None
        if isinstance(outcome, str):
            raise CandidateFailed(outcome)
        return outcome
    finally:
        if child.is_alive():
            child.kill()
        child.join()
        receive.close()


def _child(send: Any, build: Callable[[], Any], eval_fn: EvalFn, what: str) -> None:
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    try:
        model = _step("could not build it", build)
        send.send(_timed("eval_fn failed on it", lambda: evaluate(eval_fn, model, what)))
    except CandidateFailed as exc:
        send.send(str(exc))
    except BaseException as exc:  # anything else is still this candidate's failure
        send.send(first_line(exc))
    send.close()


def _exit_text(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"
