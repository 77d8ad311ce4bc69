"""Several workers on one study: liveness of running trials, and recovery of crashed ones.

Optuna's own heartbeat only runs inside ``study.optimize``; autoquant drives trials with
ask/tell, so it records liveness itself, in trial user attributes (which every storage keeps):
``worker`` ("host:pid") once, and ``heartbeat`` (a UNIX time) every ``interval`` seconds while
the trial runs. A RUNNING trial is stale when its worker is a dead process on this host, or when
its heartbeat is older than ``grace_s`` (a worker on another host that stopped beating).
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import threading
import time
from types import TracebackType

import optuna
from optuna.exceptions import UpdateFinishedTrialError

log = logging.getLogger("autoquant")

HOST = socket.gethostname()
WORKER_ATTR = "worker"
HEARTBEAT_ATTR = "heartbeat"
STALE_ATTR = "stale"
DEFAULT_GRACE_S = 300.0


def worker_id() -> str:
    return f"{HOST}:{os.getpid()}"


class Heartbeat:
    """Context manager: marks ``trial`` as this worker's and refreshes its heartbeat in a thread."""

    def __init__(self, study: optuna.Study, trial_id: int, *, interval: float = 10.0) -> None:
        self.storage, self.trial_id, self.interval = study._storage, trial_id, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="autoquant-heartbeat", daemon=True)

    def __enter__(self) -> Heartbeat:
        self.storage.set_trial_user_attr(self.trial_id, WORKER_ATTR, worker_id())
        self.storage.set_trial_user_attr(self.trial_id, HEARTBEAT_ATTR, time.time())
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.storage.set_trial_user_attr(self.trial_id, HEARTBEAT_ATTR, time.time())
            except UpdateFinishedTrialError:
                return
            except Exception as exc:  # a missed beat is not worth failing the trial for
                log.debug("heartbeat of trial %d failed: %s", self.trial_id, exc)


def is_stale(trial: optuna.trial.FrozenTrial, *, grace_s: float = DEFAULT_GRACE_S, now: float | None = None) -> bool:
    """Whether a RUNNING trial's worker is gone (see the module docstring)."""
    if trial.state != optuna.trial.TrialState.RUNNING:
        return False
    worker = trial.user_attrs.get(WORKER_ATTR)
    beat = trial.user_attrs.get(HEARTBEAT_ATTR)
    if worker is None or beat is None:
        # Asked but never marked: a crash between ask and the first attribute; judge by start time.
        started = trial.datetime_start.timestamp() if trial.datetime_start else 0.0
        return (now or time.time()) - started > grace_s
    host, _, pid = str(worker).rpartition(":")
    if host == HOST and pid.isdigit() and not _alive(int(pid)):
        return True
    return (now or time.time()) - float(beat) > grace_s


def fail_stale_trials(study: optuna.Study, *, grace_s: float = DEFAULT_GRACE_S) -> list[optuna.trial.FrozenTrial]:
    """Mark the stale RUNNING trials FAIL (attribute ``stale``) and return those this worker failed.

    Two workers may find the same stale trial: the storage lets only one finish it, and only that
    one gets it back (to run its config again).
    """
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if not is_stale(trial, grace_s=grace_s):
            continue
        try:
            study._storage.set_trial_user_attr(trial._trial_id, STALE_ATTR, True)
            study._storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
        except UpdateFinishedTrialError:
            continue
        log.warning("Trial %d was left RUNNING by a stopped worker (%s): marked FAIL; its config runs again.",
                    trial.number, trial.user_attrs.get(WORKER_ATTR, "unknown"))
        failed.append(trial)
    return failed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def claimed_by_earlier(study: optuna.Study, number: int, key: str, *, wait_s: float = 10.0) -> int | None:
    """The lower-numbered trial (running or finished, any worker) with config ``key``, if any.

    Trial numbers are handed out atomically, so "the lower number runs it" settles two workers
    picking one config at the same moment. A lower trial asked in the last ``wait_s`` seconds whose
    config is not written yet (its worker is between ask and its first attribute) is waited for.
    """
    states = (optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.COMPLETE)
    deadline = time.monotonic() + wait_s
    while True:
        pending = False
        now = datetime.datetime.now()
        for t in study.get_trials(deepcopy=False, states=states):
            if t.number >= number:
                continue
            other = t.user_attrs.get("config_key")
            if other == key:
                return t.number
            if other is None and t.state == optuna.trial.TrialState.RUNNING and t.datetime_start is not None:
                pending = pending or (now - t.datetime_start).total_seconds() < wait_s
        if not pending or time.monotonic() > deadline:
            return None
        time.sleep(0.05)
