"""The autoquant command on a tiny real FX job: help, validate, space, tune, report."""

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
    capsys.readouterr()

    for name in ("history.csv", "trials.png", "tradeoff.png"):
        (out / name).unlink()
    assert main(["report", str(out)]) == 0
    text = capsys.readouterr().out
    assert "5 trial(s)" in text and "chosen (*)" in text
    history = pd.read_csv(out / "history.csv")
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
