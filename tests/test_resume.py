"""kill -9 in the middle of a real job, then start it again: nothing finished is lost or run twice."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import yaml

from autoquant import QuantConfig
from autoquant.adapters.fx import FXAdapter

JOB = Path(__file__).parent / "jobs" / "tiny.yaml"
GRID = 8  # candidates of tiny.yaml's space


def start(out: Path, sleep: float) -> subprocess.Popen:
    env = {**os.environ, "AQ_TEST_EVAL_SLEEP": str(sleep)}
    return subprocess.Popen([sys.executable, "-m", "autoquant.cli", "tune", str(JOB), "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def load(out: Path) -> optuna.Study:
    return optuna.load_study(study_name="tiny", storage=f"sqlite:///{out / 'study.db'}")


def _progress(db: Path) -> tuple[int, int]:
    """Finished trials, and running ones with a config, read-only (optuna.load_study would create
    the tables, racing the job that is creating them)."""
    if not db.exists():
        return 0, 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as con:
            done = con.execute("SELECT COUNT(*) FROM trials WHERE state = 'COMPLETE'").fetchone()[0]
            running = con.execute(
                "SELECT COUNT(*) FROM trials t JOIN trial_user_attributes a ON a.trial_id = t.trial_id "
                "WHERE t.state = 'RUNNING' AND a.key = 'config_key'").fetchone()[0]
    except sqlite3.OperationalError:  # not created yet, or locked for a moment
        return 0, 0
    return done, running


def test_kill_9_then_resume(tmp_path):
    out = tmp_path / "out"
    proc = start(out, sleep=0.7)
    deadline = time.time() + 120
    while True:  # kill once 3 trials are done and the 4th is running
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise AssertionError("the job ended before it could be killed:\n" + proc.communicate()[0][-3000:])
        time.sleep(0.1)
        done, running = _progress(out / "study.db")
        if done >= 3 and running:
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = {t.number: t for t in load(out).get_trials() if t.state.name == "COMPLETE"}
    killed = [t for t in load(out).get_trials() if t.state.name == "RUNNING"]
    assert len(killed) == 1

    resumed = start(out, sleep=0.0)
    log, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, log
    assert "Continuing study 'tiny'" in log
    assert "Loaded calibration statistics" in log and "Calibrated" not in log  # no recalibration
    assert f"Trial {killed[0].number} was left RUNNING by a stopped worker" in log

    trials = load(out).get_trials()
    for number, earlier in before.items():  # finished trials kept as they were
        assert trials[number].state.name == "COMPLETE" and trials[number].value == earlier.value
        assert trials[number].user_attrs["accuracy"] == earlier.user_attrs["accuracy"]
    stale = trials[killed[0].number]
    assert stale.state.name == "FAIL" and stale.user_attrs["stale"] is True
    evaluated = [t for t in trials if t.state.name == "COMPLETE" and "duplicate_of" not in t.user_attrs]
    keys = [t.user_attrs["config_key"] for t in evaluated]
    assert len(keys) == len(set(keys)) == GRID  # every candidate once, none twice
    assert stale.user_attrs["config_key"] in keys  # the interrupted one ran again
    assert len(trials) == GRID + 1

    result = json.loads((out / "result.json").read_text())
    # goal never met: the most accurate, the faster of equals
    best = min(evaluated, key=lambda t: (-t.user_attrs["accuracy"], t.user_attrs["latency_ratio"], t.number))
    assert result["best_trial"] == best.number and result["accuracy"] == best.user_attrs["accuracy"]
    assert result["trials"] == GRID and result["met"] is False  # one count: the stale trial is not counted

    # The chosen config YAML rebuilds the model.
    config = QuantConfig.from_dict(yaml.safe_load((out / "config.yaml").read_text()))
    assert config.to_dict() == result["config"]
    sys.path.insert(0, str(JOB.parent))
    try:
        import tiny_job
    finally:
        sys.path.remove(str(JOB.parent))
    rebuilt = FXAdapter(tiny_job.model(), tiny_job.calibration()).build(config)
    assert abs(tiny_job.eval_fn(rebuilt) - result["accuracy"]) < 1e-6


def test_calibration_cache_round_trip(tmp_path):
    import pytest
    import torch

    from autoquant import ConfigError

    sys.path.insert(0, str(JOB.parent))
    try:
        import tiny_job
    finally:
        sys.path.remove(str(JOB.parent))
    config = QuantConfig(calibration="entropy")
    first = FXAdapter(tiny_job.model(), tiny_job.calibration())
    first.calibrate()
    assert first.save_stats(tmp_path / "stats.json")
    second = FXAdapter(tiny_job.model(), tiny_job.calibration()[:1])
    second._calib_data = None  # calibrating now would fail: the cache must make it unnecessary
    assert second.load_stats(tmp_path / "stats.json")
    x = tiny_job.calibration()[0]
    assert torch.equal(first.build(config)(x), second.build(config)(x))

    class Other(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(108, 4)

        def forward(self, x):
            return self.fc(torch.flatten(x, 1))

    with pytest.raises(ConfigError, match="holds statistics for other tensors"):
        FXAdapter(Other(), tiny_job.calibration()).load_stats(tmp_path / "stats.json")
