"""Several workers on one study: liveness of running trials, and recovery of crashed ones.

Optuna's own heartbeat only runs inside ``study.optimize``; autoquant drives trials with
ask/tell, so it records liveness itself, in trial user attributes (which every storage keeps):
``worker`` ("host:pid") in the same storage call that creates the trial (``start_trial``), and
``heartbeat`` (a UNIX time) every ``interval`` seconds while the trial runs. A RUNNING trial is
stale when its worker is a dead process on this host, or when its heartbeat is older than
``grace_s`` (a worker on another host that stopped beating).
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import threading
import time
from types import TracebackType
from typing import Any

import optuna
from optuna.exceptions import UpdateFinishedTrialError

from autoquant.space import QuantConfig
from autoquant.trials import CONFIG_KEY, ERROR, HEARTBEAT, STALE, WORKER, TrialRecord, TrialState, study_records

log = logging.getLogger("autoquant")

HOST = socket.gethostname()
DEFAULT_GRACE_S = 300.0


def worker_id() -> str:
    return f"{HOST}:{os.getpid()}"


def start_trial(study: optuna.Study, params: dict[str, Any] | None = None) -> optuna.Trial:
    """A new RUNNING trial of this worker, created with its worker, heartbeat and ``params`` in one
    storage call: no other worker can take its parameters (as with enqueue_trial + ask), and no
    crash can leave it without its worker."""
    template = optuna.trial.FrozenTrial(
        number=-1, state=TrialState.RUNNING, value=None, datetime_start=datetime.datetime.now(),
        datetime_complete=None, params={}, distributions={},
        user_attrs={WORKER: worker_id(), HEARTBEAT: time.time()},
        system_attrs={"fixed_params": params} if params else {}, intermediate_values={}, trial_id=-1,
    )
    trial_id = study._storage.create_new_trial(study._study_id, template_trial=template)
    return optuna.Trial(study, trial_id)  # Space.suggest then reads the fixed params


class Heartbeat:
    """Context manager: marks ``trial`` as this worker's and refreshes its heartbeat in a thread."""

    def __init__(self, study: optuna.Study, trial_id: int, *, interval: float = 10.0) -> None:
        self.storage, self.trial_id, self.interval = study._storage, trial_id, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="autoquant-heartbeat", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.storage.set_trial_user_attr(self.trial_id, HEARTBEAT, time.time())
            except UpdateFinishedTrialError:
                return
            except Exception as exc:  # a missed beat is not worth failing the trial for, but others may
                log.warning("Heartbeat of trial id %d failed (%s): past %.0f s without one, other workers "
                            "take this trial for stale.", self.trial_id, exc, DEFAULT_GRACE_S)


def is_stale(trial: optuna.trial.FrozenTrial, *, grace_s: float = DEFAULT_GRACE_S, now: float | None = None) -> bool:
    """Whether a RUNNING trial's worker is gone (see the module docstring)."""
    if trial.state != optuna.trial.TrialState.RUNNING:
        return False
    record = TrialRecord.of(trial)
    worker, beat = record.worker, record.heartbeat
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
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not is_stale(trial, grace_s=grace_s):
            continue
        if not abandon(study, trial._trial_id, "left RUNNING by a stopped worker"):
            continue
        log.warning("Trial %d was left RUNNING by a stopped worker (%s): marked FAIL; its config runs again.",
                    trial.number, TrialRecord.of(trial).worker or "unknown")
        failed.append(trial)
    return failed


def abandon(study: optuna.Study, trial_id: int, reason: str) -> bool:
    """Mark a RUNNING trial FAIL and stale (its config runs again, it does not count); False if
    another worker finished it first."""
    try:
        study._storage.set_trial_user_attr(trial_id, STALE, True)
        study._storage.set_trial_user_attr(trial_id, ERROR, reason)
        study._storage.set_trial_state_values(trial_id, TrialState.FAIL)
    except UpdateFinishedTrialError:
        return False
    return True


def to_rerun(study: optuna.Study) -> list[QuantConfig]:
    """Configs of stale trials (killed or stopped) that no later trial has taken up, oldest first."""
    trials = study_records(study)
    later: set[str] = set()
    rerun: list[QuantConfig] = []
    for t in reversed(trials):
        if t.stale and t.config is not None and t.config_key not in later:
            rerun.append(t.config)
        if t.config_key is not None:
            later.add(t.config_key)
    return rerun[::-1]


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
    states = (TrialState.RUNNING, TrialState.COMPLETE)
    deadline = time.monotonic() + wait_s
    while True:
        pending = False
        now = datetime.datetime.now()
        for t in study.get_trials(deepcopy=False, states=states):
            if t.number >= number:
                continue
            other = t.user_attrs.get(CONFIG_KEY)
            if other == key:
                return t.number
            if other is None and t.state == TrialState.RUNNING and t.datetime_start is not None:
                pending = pending or (now - t.datetime_start).total_seconds() < wait_s
        if not pending or time.monotonic() > deadline:
            return None
        time.sleep(0.05)
