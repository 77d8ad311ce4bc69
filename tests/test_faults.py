"""Injected faults: after each, nothing finished is lost and nothing is evaluated twice.

SIGKILL mid-trial is tests/test_resume.py; PostgreSQL restarted under two workers is
tests/test_distributed.py. Here: SIGTERM, a hanging eval_fn (timeout, in process and isolated),
a crashing candidate (the child process dies), a corrupt calibration cache, a changed model or
data in a reused study, and a trial whose worker died right after creating it.
"""

import json
import os
import signal
import subprocess
import sys
import time

import optuna
import pytest

from autoquant import AccuracyCriterion, ConfigError, Restriction, Tuner
from autoquant.trials import FINGERPRINT, records
from autoquant.workers import fail_stale_trials, start_trial
from tests.fake_adapter import FakeAdapter, accuracy, fake_model
from tests.test_resume import GRID, JOB, _progress, load

PINNED = Restriction(calibration="minmax", scheme="asymmetric", granularity="per_channel")  # 8 candidates


def fake_tune(eval_fn=accuracy, model=None, **kwargs):
    tuner = Tuner(strategy="exhaustive", restrict=PINNED, criterion=None, **kwargs)
    return tuner.tune(model or fake_model(n_ops=3, sensitive={0: 0.5, 1: 0.5, 2: 0.5}), [None], eval_fn,
                      adapter=FakeAdapter)


def evaluated_once(study: optuna.Study) -> list[str | None]:
    keys = [t.config_key for t in records(study.trials) if t.evaluated]
    assert len(keys) == len(set(keys)), "a config was evaluated twice"
    return keys


def _pick(config, n_fp32: int) -> bool:
    """The one candidate a fault is injected into: exactly ``n_fp32`` ops in FP32, op0 among them."""
    return config is not None and len(config.fp32_ops) == n_fp32 and "op0" in config.fp32_ops


# --- SIGTERM --------------------------------------------------------------------------------------
def test_sigterm_records_the_running_trial_and_tune_continues(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "AQ_TEST_EVAL_SLEEP": "0.7"}
    cmd = [sys.executable, "-m", "autoquant.cli", "tune", str(JOB), "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.time() + 120
    while True:  # stop it once 2 trials are done and the 3rd is running
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.1)
        done, running = _progress(out / "study.db")
        if done >= 2 and running:
            break
    proc.send_signal(signal.SIGTERM)
    log, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2, log
    log = " ".join(log.split())  # rich wraps long lines
    assert "Stopped by SIGTERM" in log and "Run the same job again to continue it" in log
    assert "INT8 accuracy" in log  # the summary of what finished
    before = {t.number: t for t in load(out).get_trials() if t.state.name == "COMPLETE"}
    stopped = [t for t in records(load(out).get_trials()) if t.stale]
    assert len(before) >= 2 and len(stopped) == 1 and "stopped (SIGTERM)" in stopped[0].error
    assert not [t for t in load(out).get_trials() if t.state.name == "RUNNING"]

    again = subprocess.run(cmd, capture_output=True, text=True, env={**env, "AQ_TEST_EVAL_SLEEP": "0"}, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    study = load(out)
    for number, earlier in before.items():
        assert study.trials[number].value == earlier.value  # kept as it was
    keys = evaluated_once(study)
    assert len(keys) == GRID and stopped[0].config_key in keys  # the stopped one ran again, once
    assert json.loads((out / "result.json").read_text())["trials"] == GRID


# --- hangs and crashes ----------------------------------------------------------------------------
@pytest.mark.parametrize("isolate", [False, True], ids=["in-process", "isolated"])
def test_a_hanging_eval_fn_times_out_and_the_job_goes_on(isolate):
    def hangs(model):
        if _pick(model.config, 1):
            time.sleep(120)
        return model.accuracy()

    start = time.perf_counter()
    result = fake_tune(hangs, max_trials=GRID, trial_timeout=1.0, isolate=isolate)
    assert time.perf_counter() - start < 60
    assert len(result.failed_trials) == 1
    assert "timed out after 1 s" in next(iter(result.failed_trials.values()))
    assert result.met and result.evaluations == GRID - 1  # every other candidate, once


def test_a_crashing_candidate_kills_only_its_child_process(tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"

    def segfaults(model):
        if _pick(model.config, 1):
            os.kill(os.getpid(), signal.SIGSEGV)  # as a crash in a backend kernel would
        return model.accuracy()

    result = fake_tune(segfaults, max_trials=GRID, isolate=True, storage=storage, study_name="job")
    (number, reason), = result.failed_trials.items()
    assert "crashed the evaluation process (killed by signal SIGSEGV)" in reason
    study = optuna.load_study(study_name="job", storage=storage)
    assert study.trials[number].state.name == "FAIL"
    assert len(evaluated_once(study)) == GRID - 1 and result.met


def test_an_isolated_candidate_is_scored_once_in_its_child(tmp_path):
    calls = tmp_path / "calls"

    def counted(model):
        with calls.open("a") as f:  # a child's calls are not in this process's memory
            f.write(f"{os.getpid()}\n")
        return model.accuracy()

    result = fake_tune(counted, max_trials=GRID, isolate=True)
    pids = calls.read_text().split()
    assert result.evaluations == GRID and len(pids) == 1 + GRID  # the FP32 baseline, then each candidate once
    assert pids[0] == str(os.getpid()) and str(os.getpid()) not in pids[1:]  # candidates only in children


# --- reused study or cache --------------------------------------------------------------------------
def _tiny():
    sys.path.insert(0, str(JOB.parent))
    try:
        import tiny_job
    finally:
        sys.path.remove(str(JOB.parent))
    return tiny_job


def tiny_tune(tmp_path, model, data, **kwargs):
    tiny = _tiny()
    tuner = Tuner(AccuracyCriterion(absolute=0.0), strategy="exhaustive", max_trials=2,
                  storage=f"sqlite:///{tmp_path / 'study.db'}",
                  study_name="tiny", stats_cache=tmp_path / "calibration-stats.json", latency_budget_s=0.01,
                  restrict=Restriction(approach="static", calibration="minmax", scheme="asymmetric"), **kwargs)
    return tuner.tune(model, data, tiny.eval_fn, adapter="fx")


def test_a_changed_model_or_data_in_a_reused_study_is_refused(tmp_path):
    import torch

    tiny = _tiny()
    first = tiny_tune(tmp_path, tiny.model(), tiny.calibration())
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'study.db'}")
    stored = study.user_attrs[FINGERPRINT]
    # The same model and data, reshuffled and rebatched: the same study, continued.
    shuffled = list(torch.cat(tiny.calibration()).flip(0).split(4))
    tiny_tune(tmp_path, tiny.model(), shuffled, restart=False)

    changed = tiny.Tiny().eval()
    changed.load_state_dict(tiny.model().state_dict())
    with torch.no_grad():
        changed.fc.weight[0, 0] += 0.5
    with pytest.raises(ConfigError, match="the model changed.*--restart"):
        tiny_tune(tmp_path, changed, tiny.calibration())
    with pytest.raises(ConfigError, match="the calibration data changed"):
        tiny_tune(tmp_path, tiny.model(), [x + 1 for x in tiny.calibration()])
    assert len(optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'study.db'}").trials) == 2

    again = tiny_tune(tmp_path, changed, tiny.calibration(), restart=True)  # the fix the message names
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'study.db'}")
    assert study.user_attrs[FINGERPRINT]["model"] != stored["model"] and len(study.trials) == 2
    assert again.baseline_accuracy != first.baseline_accuracy  # measured again, for the new model


def test_a_calibration_cache_of_another_model_is_refused(tmp_path):
    import torch

    tiny = _tiny()
    tiny_tune(tmp_path, tiny.model(), tiny.calibration())
    (tmp_path / "study.db").unlink()  # a new study, the old cache
    changed = tiny.Tiny().eval()
    with torch.no_grad():
        changed.load_state_dict({k: v * 1.5 for k, v in tiny.model().state_dict().items()})
    with pytest.raises(ConfigError, match="calibration cache .* was made for another model"):
        tiny_tune(tmp_path, changed, tiny.calibration())


@pytest.mark.parametrize("damage", ["truncated", "edited"])
def test_a_corrupt_calibration_cache_is_recalibrated(tmp_path, caplog, damage):
    tiny = _tiny()
    tiny_tune(tmp_path, tiny.model(), tiny.calibration())
    cache = tmp_path / "calibration-stats.json"
    text = cache.read_text()
    if damage == "truncated":
        cache.write_text(text[: len(text) // 2])
    else:  # one statistic changed by hand, still valid JSON
        cache.write_text(text.replace('"count": ', '"count": 1', 1))
        assert cache.read_text() != text
    caplog.set_level("INFO", logger="autoquant")
    result = tiny_tune(tmp_path, tiny.model(), tiny.calibration())
    assert ("unreadable" if damage == "truncated" else "fails its checksum") in caplog.text
    assert "Loaded calibration statistics" not in caplog.text
    assert json.loads(cache.read_text())["sha256"]  # rewritten whole
    assert len(result.history) == 2  # the two finished trials, kept


# --- a worker that dies right after creating its trial -------------------------------------------------
def test_a_trial_left_by_a_dead_worker_on_this_host_is_stale_at_once(tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    optuna.create_study(storage=storage, study_name="s")
    code = ("import optuna, os; from autoquant.workers import start_trial; "
            f"start_trial(optuna.load_study(study_name='s', storage='{storage}')); os._exit(0)")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    study = optuna.load_study(study_name="s", storage=storage)
    (left,) = records(study.trials)
    assert left.worker and left.worker.endswith(":" + left.worker.rpartition(":")[2])
    assert [t.number for t in fail_stale_trials(study, grace_s=300)] == [0]  # no 300 s wait


def test_start_trial_fixes_the_params_in_the_same_call(tmp_path):
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'study.db'}")
    trial = start_trial(study, {"x": "b"})
    assert trial.suggest_categorical("x", ["a", "b"]) == "b"
    assert records(study.trials)[0].worker is not None


# --- a candidate that fails in the probe ------------------------------------------------------------
def test_the_probe_steps_past_a_candidate_that_cannot_be_built(monkeypatch, caplog):
    original = FakeAdapter.build

    def build(self, config):
        if config.calibration == "mse" or "op1" not in config.fp32_ops and "op2" not in config.fp32_ops:
            raise RuntimeError("promoteTypes with quantized numbers is not handled yet")
        return original(self, config)

    monkeypatch.setattr(FakeAdapter, "build", build)
    caplog.set_level("WARNING", logger="autoquant")
    tuner = Tuner(strategy="sensitivity", max_trials=12)
    result = tuner.tune(fake_model(n_ops=4, sensitive={1: 0.5}), [None], accuracy, adapter=FakeAdapter)
    assert "Probe: candidate static/mse" in caplog.text  # ranked, not fatal
    assert result.met and "op1" in result.fp32_ops
    assert tuner.strategy.sensitivity is not None and len(tuner.strategy.sensitivity) == 4
