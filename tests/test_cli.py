"""The autoquant command on a tiny real FX job: help, validate, space, tune, report."""

import json
import re
import sys
from pathlib import Path

import pandas as pd
import pytest

from autoquant.cli import build_parser, main

JOB = Path(__file__).parent / "jobs" / "tiny.yaml"


@pytest.mark.parametrize("verb, words", [
    ("tune", ["continue it", "--max-trials", "--out"]),
    ("resume", ["an error if there is none"]),
    ("validate", ["without running"]),
    ("space", ["ops and knobs"]),
    ("report", ["history.csv", "OUTDIR_or_JOB.yaml"]),
])
def test_help_of_each_verb(capsys, verb, words):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args([verb, "--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for word in words:
        assert word in text


def test_validate_and_space(capsys):
    assert main(["validate", str(JOB)]) == 0
    out = capsys.readouterr().out
    assert "valid job 'tiny'" in out and "eval: tiny_job:eval_fn (importable)" in out
    assert main(["space", str(JOB)]) == 0
    out = capsys.readouterr().out
    assert "2 quantizable op(s)" in out and "conv" in out and "fc" in out
    assert "calibration=minmax;" in out  # the job's restriction applies


def test_errors_exit_2_with_the_message(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(JOB.read_text().replace("name: exhaustive", "name: exhaustiv"))
    assert main(["validate", str(bad)]) == 2
    assert "Did you mean 'exhaustive'?" in capsys.readouterr().out
    assert main(["resume", str(JOB), "--out", str(tmp_path / "none")]) == 2
    assert "Nothing to resume" in " ".join(capsys.readouterr().out.split())


def test_tune_writes_everything_and_report_rebuilds_it(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["tune", str(JOB), "--out", str(out), "--max-trials", "5"]) == 0
    for name in ("model.pt", "result.json", "history.csv", "config.yaml", "job.yaml", "calibration-stats.json",
                 "trials.png", "tradeoff.png", "study.db"):
        assert (out / name).exists(), name
    assert len(pd.read_csv(out / "history.csv")) == 5
    summary = " ".join(capsys.readouterr().out.split())
    assert "quantized (whole model)" in summary and " of " in summary  # counts by op kind, whole model
    assert "quantized" in json.loads((out / "result.json").read_text())

    for name in ("history.csv", "trials.png", "tradeoff.png"):
        (out / name).unlink()
    assert main(["report", str(out)]) == 0
    text = capsys.readouterr().out
    assert "5 trial(s)" in text and "chosen (*)" in text
    history = pd.read_csv(out / "history.csv")
    cells = "".join(text.replace("│", "").split())  # at rich's 80 columns the config column folds, never cuts
    assert all(config.replace(" ", "") in cells for config in history["config"])
    assert list(history["trial"]) == [0, 1, 2, 3, 4] and history["accuracy"].notna().all()
    for name in ("trials.png", "tradeoff.png"):
        data = (out / name).read_bytes()
        assert data[:4] == b"\x89PNG" and len(data) > 10_000

    # tune again with a larger budget continues the study instead of starting over
    assert main(["resume", str(JOB), "--out", str(out), "--max-trials", "6"]) == 0
    assert len(pd.read_csv(out / "history.csv")) == 6


def test_sweep_runs_resumes_and_summarises(tmp_path, capsys):
    import importlib.util

    path = Path(__file__).parent.parent / "experiments" / "sweep.py"
    spec = importlib.util.spec_from_file_location("aq_sweep", path)
    sweep = importlib.util.module_from_spec(spec)
    sys.modules["aq_sweep"] = sweep
    spec.loader.exec_module(sweep)
    config = tmp_path / "sweep.yaml"
    config.write_text(f"jobs: {{tiny: {JOB}}}\nstrategies: [exhaustive]\n"
                      "criteria: [{absolute: 0.0}, {absolute: 0.000004}]\nseeds: [0]\nmax_trials: 3\noutput: out\n")
    assert sweep.main([str(config)]) == 0
    out = tmp_path / "out"
    table = pd.read_csv(out / "sweep.csv")
    assert len(table) == 2 and set(table["criterion"]) == {"abs0", "abs4e-06"}
    assert (table["trials"] <= 3).all()
    # exhaustive's third candidate (conv in FP32) meets the looser criterion; nothing meets the strict one
    row = table[(table["strategy"] == "exhaustive") & (table["criterion"] == "abs4e-06")].iloc[0]
    assert row["met"] and row["trials_to_meet"] == 3
    assert not table[table["criterion"] == "abs0"]["met"].any()
    assert "## By strategy" in (out / "summary.md").read_text()
    for name in ("sweep-trials-to-meet.png", "sweep-latency-accuracy.png", "sweep-wall-time.png"):
        assert (out / name).stat().st_size > 10_000
    capsys.readouterr()
    assert sweep.main([str(config)]) == 0  # again: every run is already done
    assert capsys.readouterr().out.count("autoquant: goal") == 0
    assert pd.read_csv(out / "sweep.csv").equals(table)


def test_version(capsys):
    import autoquant

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"autoquant {autoquant.__version__}"


def test_bad_overrides_are_refused_like_yaml(tmp_path, capsys):
    out = ["--out", str(tmp_path / "o")]
    assert main(["tune", str(JOB), "--relative", "1.5", *out]) == 2
    assert "write 0.015 for 1.5%" in " ".join(capsys.readouterr().out.split())
    assert main(["tune", str(JOB), "--strategy", "exhaustiv", *out]) == 2
    assert "Did you mean 'exhaustive'?" in " ".join(capsys.readouterr().out.split())
    with pytest.raises(SystemExit):  # one goal at a time
        build_parser().parse_args(["tune", str(JOB), "--relative", "0.1", "--absolute", "0.1"])
    assert not (tmp_path / "o").exists()


def test_overrides_apply_and_report_finds_a_study_without_name(tmp_path, capsys):
    import yaml

    job = tmp_path / "unnamed.yaml"
    job.write_text(JOB.read_text().replace("name: tiny\n", "").replace("tiny_job:", f"{JOB.parent / 'tiny_job.py'}:"))
    out = tmp_path / "out"
    argv = ["tune", str(job), "--out", str(out), "--strategy", "random", "--absolute", "0.5", "--max-trials", "2"]
    assert main(argv) == 0
    written = yaml.safe_load((out / "job.yaml").read_text())
    assert written["name"] == "unnamed"
    assert written["strategy"]["name"] == "random" and written["strategy"]["max_trials"] == 2
    assert written["criterion"] == {"absolute": 0.5, "higher_is_better": True, "allow_large_relative": False}
    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    # 1 trial, or 2 when the first passes but runs slower than FP32 (the search goes on for a faster one)
    assert re.search(r"study 'unnamed': [12] trial\(s\)", " ".join(capsys.readouterr().out.split()))


def test_space_prints_what_print_space_prints(capsys):
    from autoquant.cli import make_tuner
    from autoquant.config import load_job

    assert main(["space", str(JOB)]) == 0
    out = capsys.readouterr().out
    job = load_job(JOB)
    space = make_tuner(job).space(job.load_model(), job.load_calibration(), adapter=job.adapter)
    assert str(space) in out
    assert "op    type" in str(space) and "knobs: approach=static;" in str(space)


def test_committed_yaml_reference_is_current(capsys):
    committed = Path(__file__).parent.parent / "docs" / "yaml-reference.md"
    assert main(["schema"]) == 0
    assert committed.read_text() == capsys.readouterr().out, "stale: run autoquant schema > docs/yaml-reference.md"


def test_trial_timeout_and_isolate_from_yaml_fail_trials_not_the_job(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("AQ_TEST_EVAL_SLEEP", "1.5")  # every eval_fn call outlasts the 1 s limit
    job = tmp_path / "guarded.yaml"
    job.write_text(JOB.read_text().replace("tiny_job:", f"{JOB.parent / 'tiny_job.py'}:").replace(
        "strategy: {name: exhaustive, max_trials: 8, seed: 0}",
        "strategy: {name: exhaustive, max_trials: 3, seed: 0, isolate: true, trial_timeout: 1}"))
    out = tmp_path / "out"
    assert main(["tune", str(job), "--out", str(out)]) == 2
    captured = capsys.readouterr()
    text = " ".join((captured.out + captured.err).split())
    assert "No candidate could be built or evaluated" in text
    assert text.count("timed out after 1 s (trial_timeout; the evaluation process was killed)") >= 3
    import optuna

    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{out / 'study.db'}")
    assert [t.state.name for t in study.trials] == ["FAIL"] * 3  # recorded, with the job's history kept
