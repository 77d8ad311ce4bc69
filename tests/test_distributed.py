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
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import optuna
import pytest

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


def run_workers(job: Path, tmp_path: Path, n: int = 2) -> list[str]:
    env = {**os.environ, "AQ_TEST_EVAL_SLEEP": "0.3"}
    commands = [[sys.executable, "-m", "autoquant.cli", "tune", str(job), "--out", str(tmp_path / f"w{i}")]
                for i in range(n)]
    procs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for command in commands]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    for p, log in zip(procs, logs, strict=False):
        assert p.returncode == 0, log
    return logs


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
    trials = optuna.load_study(study_name=study_name, storage=URL).get_trials()
    evaluated = [t for t in trials if t.state.name == "COMPLETE" and "duplicate_of" not in t.user_attrs]
    keys = [t.user_attrs["config_key"] for t in evaluated]
    assert len(keys) == len(set(keys)) == 8  # the union is the whole grid, nothing evaluated twice
    assert not [t for t in trials if t.state.name == "RUNNING"]
    workers = {t.user_attrs["worker"] for t in evaluated}
    assert len(workers) == 2  # both did part of the work
    password = urlsplit(URL).password
    assert password
    for log in logs:
        assert password not in log and "***" in log  # the password is never printed
    for i in range(2):
        assert password not in (tmp_path / f"w{i}" / "job.yaml").read_text()


@needs_pg
def test_all_workers_stop_once_the_goal_is_met(tmp_path, study_name):
    # Met by the first candidate with one op in FP32 (trial 3 or so of the grid's order).
    logs = run_workers(job_file(tmp_path, study_name, "criterion: {absolute: 0.00002}"), tmp_path)
    trials = optuna.load_study(study_name=study_name, storage=URL).get_trials()
    passed = [t for t in trials if t.user_attrs.get("passed")]
    assert passed and len(trials) < 8
    assert not [t for t in trials if t.state.name == "RUNNING"]
    assert any("Stopping: another worker met the goal." in log or "goal MET" in log for log in logs)


def test_two_workers_on_a_journal_file(tmp_path):
    from autoquant.config import load_job

    job = job_file(tmp_path, "journal", "criterion: {absolute: 0.0}", storage="journal:study.journal")
    run_workers(job, tmp_path)
    trials = optuna.load_study(study_name="journal", storage=load_job(job).storage()).get_trials()
    evaluated = [t for t in trials if t.state.name == "COMPLETE" and "duplicate_of" not in t.user_attrs]
    keys = [t.user_attrs["config_key"] for t in evaluated]
    assert len(keys) == len(set(keys)) == 8
    assert len({t.user_attrs["worker"] for t in evaluated}) == 2
