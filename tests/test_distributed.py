"""Two worker processes on one study split the trials, with no gap and no duplicate.

PostgreSQL (several machines) needs a database: set AUTOQUANT_TEST_PG_URL (e.g.
postgresql://autoquant:PASSWORD@127.0.0.1:5432/autoquant_test; .ci/run sets it up), else those
tests are skipped. With AUTOQUANT_REQUIRE_PG=1 (set by .ci/run once its database is up) an
unreachable database fails them instead. Optuna's journal file (several processes on one
machine) always runs.
"""

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import optuna
import pytest

from autoquant.space import KNOBS, OP_PARAM_PREFIX
from autoquant.trials import records

URL = os.environ.get("AUTOQUANT_TEST_PG_URL")
JOBS = Path(__file__).parent / "jobs"


REQUIRED = os.environ.get("AUTOQUANT_REQUIRE_PG") == "1"


def _unreachable() -> str | None:
    """Why the database cannot be used, or None when it can."""
    if not URL:
        return "AUTOQUANT_TEST_PG_URL is not set"
    try:
        import psycopg  # psycopg 3, the driver the project installs ("postgres" extra)

        scheme, rest = URL.split("://", 1)
        psycopg.connect(scheme.split("+")[0] + "://" + rest, connect_timeout=3).close()  # no SQLAlchemy "+driver"
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


WHY_NOT = _unreachable()
if WHY_NOT and REQUIRED:
    raise RuntimeError(f"AUTOQUANT_REQUIRE_PG=1 but PostgreSQL is not usable ({WHY_NOT}): the PostgreSQL tests "
                       "would skip. Start the database (.ci/run does) or unset AUTOQUANT_REQUIRE_PG.")
needs_pg = pytest.mark.skipif(WHY_NOT is not None, reason=f"no PostgreSQL: {WHY_NOT}")


def job_file(tmp_path: Path, name: str, criterion: str, storage: str = "${AUTOQUANT_TEST_PG_URL}") -> Path:
    text = (JOBS / "tiny.yaml").read_text()
    text = text.replace("name: tiny", f"name: {name}").replace("model: tiny_job", f"model: {JOBS}/tiny_job.py")
    text = text.replace("calibration: tiny_job", f"calibration: {JOBS}/tiny_job.py")
    text = text.replace("eval: tiny_job", f"eval: {JOBS}/tiny_job.py").replace("criterion: {absolute: 0.0}", criterion)
    text = text.replace("max_trials: 8", "max_trials: 50")  # the grid's end stops the workers
    path = tmp_path / "job.yaml"
    path.write_text(text + f"storage: {storage}\n")
    return path


def start_workers(job: Path, tmp_path: Path, n: int = 2, sleep: float = 0.3) -> list[subprocess.Popen]:
    env = {**os.environ, "AQ_TEST_EVAL_SLEEP": str(sleep)}
    commands = [[sys.executable, "-m", "autoquant.cli", "tune", str(job), "--out", str(tmp_path / f"w{i}")]
                for i in range(n)]
    return [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
            for command in commands]


def run_workers(job: Path, tmp_path: Path, n: int = 2) -> list[str]:
    procs = start_workers(job, tmp_path, n)
    logs = [p.communicate(timeout=300)[0] for p in procs]
    for p, log in zip(procs, logs, strict=False):
        assert p.returncode == 0, log
    return logs


def check_grid(trials: list[optuna.trial.FrozenTrial], workers: int) -> None:
    """The union of the workers' trials is the whole grid, nothing evaluated twice, each trial's
    Optuna parameters its own config's (not another worker's proposal), nothing left RUNNING."""
    evaluated = [(t, r) for t, r in zip(trials, records(trials), strict=True) if r.evaluated]
    keys = [r.config_key for _, r in evaluated]
    assert len(keys) == len(set(keys)) == 8
    for trial, record in evaluated:
        config = record.config
        assert config is not None
        assert {k: trial.params[k] for k in KNOBS if getattr(config, k) is not None} == \
            {k: getattr(config, k) for k in KNOBS if getattr(config, k) is not None}
        ops = {name[len(OP_PARAM_PREFIX):]: value for name, value in trial.params.items()
               if name.startswith(OP_PARAM_PREFIX)}
        assert {op for op, value in ops.items() if value == "fp32"} == set(config.fp32_ops)
    assert not [t for t in trials if t.state.name == "RUNNING"]
    assert len({r.worker for _, r in evaluated}) >= min(workers, 2)  # the work was shared


@pytest.fixture
def study_name():
    name = f"aq-test-{uuid.uuid4().hex[:8]}"
    yield name
    try:
        optuna.delete_study(study_name=name, storage=URL)
    except KeyError:
        pass


@needs_pg
def test_two_workers_split_the_grid(tmp_path, study_name):
    logs = run_workers(job_file(tmp_path, study_name, "criterion: {absolute: 0.0}"), tmp_path)
    check_grid(optuna.load_study(study_name=study_name, storage=URL).get_trials(), workers=2)
    password = urlsplit(URL).password
    assert password
    for log in logs:
        assert password not in log and "***" in log  # the password is never printed
    for i in range(2):
        assert password not in (tmp_path / f"w{i}" / "job.yaml").read_text()


@needs_pg
def test_all_workers_stop_once_the_goal_is_met(tmp_path, study_name):
    # Met by the first candidate with one op in FP32 (trial 3 or so of the grid's order). A pass
    # stops the workers only when it is faster than FP32 (on this tiny model INT8 often is not):
    # then the workers stop within one trial each; otherwise they search the whole grid of 8.
    logs = run_workers(job_file(tmp_path, study_name, "criterion: {absolute: 0.00002}"), tmp_path)
    trials = optuna.load_study(study_name=study_name, storage=URL).get_trials()
    assert not [t for t in trials if t.state.name == "RUNNING"]
    passes = [r for r in records(trials) if r.passed and r.measurement is not None]
    assert passes
    fast = [r.number for r in passes if r.measurement.latency_ratio < 1.0]
    if fast:  # each stopped for the right reason: its own fast pass, or another worker's
        # Once the first fast pass is stored, its worker starts nothing more and the other at most one
        # trial (begun between its last check and the pass): counted by time, not by trial number,
        # since the other may run several quick trials while the passing one is measured.
        completed = {t.number: t.datetime_complete for t in trials}
        met_at = min(completed[n] for n in fast if completed[n] is not None)
        assert len([t for t in trials if t.datetime_start is not None and t.datetime_start > met_at]) <= 1
        for log in logs:
            assert " PASS " in log or "Stopping: another worker met the goal." in log, log
    else:  # the whole grid, each config evaluated once (a worker may add a trial at the grid's end)
        check_grid(trials, 2)
        assert any("No passing candidate is faster than FP32" in log for log in logs), logs


@needs_pg
def test_postgresql_restarted_under_two_workers(tmp_path, study_name):
    """The workers reconnect, or stop with a clear message; 'tune' then finishes the study."""
    restart = os.environ.get("AUTOQUANT_TEST_PG_RESTART")
    if not restart:
        pytest.skip("no PostgreSQL restart command: set AUTOQUANT_TEST_PG_RESTART (.ci/run does)")
    job = job_file(tmp_path, study_name, "criterion: {absolute: 0.0}")
    procs = start_workers(job, tmp_path, sleep=0.6)
    assert URL

    def measured() -> int:
        try:
            return sum(r.measured for r in records(optuna.load_study(study_name=study_name, storage=URL).trials))
        except KeyError:  # the workers have not created the study yet
            return 0

    deadline = time.time() + 240
    while measured() < 2:
        if time.time() > deadline or any(p.poll() is not None for p in procs):
            for p in procs:
                p.kill()
            logs = "\n".join(p.communicate()[0][-2000:] for p in procs)
            raise AssertionError("the workers did not get going:\n" + logs)
        time.sleep(0.5)
    subprocess.run(restart, shell=True, check=True, timeout=60)
    for p in procs:
        log = " ".join(p.communicate(timeout=300)[0].split())
        assert p.returncode == 0 or "The study's storage failed" in log and "run the same job again" in log, log
    again = subprocess.run([sys.executable, "-m", "autoquant.cli", "tune", str(job), "--out", str(tmp_path / "w9")],
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    trials = optuna.load_study(study_name=study_name, storage=URL).get_trials()
    keys = [r.config_key for r in records(trials) if r.evaluated]
    assert len(keys) == len(set(keys)) == 8 and not [t for t in trials if t.state.name == "RUNNING"]


def test_two_workers_on_a_journal_file(tmp_path):
    from autoquant.config import load_job

    job = job_file(tmp_path, "journal", "criterion: {absolute: 0.0}", storage="journal:study.journal")
    run_workers(job, tmp_path, n=3)
    check_grid(optuna.load_study(study_name="journal", storage=load_job(job).storage()).get_trials(), workers=3)
