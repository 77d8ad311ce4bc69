"""Progress by phase (issue 11, point 9): on a terminal a display with the phases calibration, probe
and trials; elsewhere one log line per trial; nothing with verbose=False. The terminal cases run in
a pseudo-terminal, so the code under test sees a real tty."""

import logging
import os
import pty
import re
import subprocess
import sys
from pathlib import Path

import optuna

from autoquant.criterion import AccuracyCriterion
from autoquant.probe import OutputProbe
from autoquant.progress import trial_status
from autoquant.space import QuantConfig
from tests.fake_adapter import FakeAdapter, fake_model

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "tests" / "jobs" / "tiny.yaml"
# op1 costs half the accuracy: the default candidate (all INT8) fails, the sensitivity strategy probes,
# and the next trial, with op1 in FP32, meets the goal.
SCRIPT = """
import logging, sys
from autoquant import Tuner
from tests.fake_adapter import FakeAdapter, accuracy, fake_model
{setup}
def eval_fn(model):
    {in_eval}
    return accuracy(model)
result = Tuner(max_trials=10{tuner}).tune(fake_model(n_ops=4, sensitive={{1: 0.5}}), [None] * 4, eval_fn,
                                          adapter=FakeAdapter{tune})
if not logging.getLogger().handlers:
    assert not logging.getLogger("autoquant").handlers and logging.getLogger("autoquant").level == logging.NOTSET
print("trials", result.trials)
"""
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def script(setup: str = "", in_eval: str = "pass", tuner: str = "", tune: str = "") -> list[str]:
    return [sys.executable, "-c", SCRIPT.format(setup=setup, in_eval=in_eval, tuner=tuner, tune=tune)]


def piped(command: list[str]) -> str:
    """stderr of ``command`` run with pipes (not a terminal)."""
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stderr


def in_terminal(command: list[str], cwd: Path = ROOT) -> str:
    """Everything ``command`` writes to a pseudo-terminal, escape sequences removed."""
    master, slave = pty.openpty()
    env = dict(os.environ, COLUMNS="200", TERM="xterm-256color", PYTHONPATH=str(ROOT))
    child = subprocess.Popen(command, cwd=cwd, stdin=slave, stdout=slave, stderr=slave, env=env)
    os.close(slave)
    out = b""
    while True:
        try:
            chunk = os.read(master, 1 << 16)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    assert child.wait(timeout=120) == 0, out.decode(errors="replace")
    return ANSI.sub("", out.decode()).replace("\r", "\n")


def rows(text: str, phase: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(f"{phase} ") and "━" in line]


def test_terminal_shows_calibration_probe_and_trials_in_order_with_counts():
    text = in_terminal(script())
    calibration, probe, trials = rows(text, "calibration"), rows(text, "probe"), rows(text, "trials")
    # every calibration batch, then the probe's candidates, then the trials, each done of its total
    assert [re.search(r"\d+/\d+", r).group() for r in calibration[:4]] == ["1/4", "2/4", "3/4", "4/4"]
    assert probe and re.search(r" (\d+)/\1 ", probe[-1])  # all the candidates it planned were scored
    assert "1/10 best trial 0" in trials[0] and "2/10 best trial 1" in trials[-1]
    first = {phase: text.index(found[0]) for phase, found in (("calibration", calibration), ("probe", probe))}
    assert first["calibration"] < first["probe"] < text.index("2/10 best trial 1")
    assert text.index("4/4") < text.index("autoquant: trial 0")  # calibration is done before any trial
    # the log lines print above the display, which ends as the last frame
    assert "autoquant: FP32 baseline" in text and "autoquant: trial 1 (2/10)  PASS" in text
    last = text[text.rindex("calibration "):]
    assert [line.split()[0] for line in last.splitlines() if line.strip()][:3] == ["calibration", "probe", "trials"]
    assert text.rstrip().endswith("trials 2") and "progress: " not in text  # the display replaces the lines


def test_no_time_left_is_shown_once_the_goal_is_met():
    trials = rows(in_terminal(script()), "trials")
    met = next(i for i, row in enumerate(trials) if "goal MET" in row)
    assert "goal not met yet; at most ~" in trials[0]  # the estimate runs while the search does
    assert met > 0 and not any("s left" in row for row in trials[met:])
    lines = [line for line in piped(script()).splitlines() if "progress: " in line]
    assert "at most ~" in lines[0] and "goal MET" in lines[-1] and "s left" not in lines[-1]


def test_plain_lines_when_stderr_is_not_a_terminal():
    err = piped(script())
    assert "autoquant: FP32 baseline" in err and "autoquant: trial 0" in err
    # a progress line per trial: trials done of the budget, best so far, time left, elapsed
    assert "autoquant: progress: 1/10 trials; best trial 0" in err and " s elapsed" in err
    assert "━" not in err and "\x1b[" not in err


def test_callers_logging_gets_plain_lines_even_on_a_terminal():
    text = in_terminal(script(setup="logging.basicConfig(level=logging.INFO, format='mine: %(message)s')"))
    assert "mine: progress: 1/10 trials; best trial 0" in text and "━" not in text


def test_verbose_false_prints_nothing():
    assert in_terminal(script(tune=", verbose=False")).split() == ["trials", "2"]
    assert piped(script(tune=", verbose=False")) == ""


def test_isolated_trials_keep_the_display_working():
    # eval_fn runs in a forked child that prints: the child draws nothing broken and does not hang
    text = in_terminal(script(setup="import os; PARENT = os.getpid()", tuner=", isolate=True",
                              in_eval="print('eval in', 'the parent' if os.getpid() == PARENT else 'a child')"))
    assert text.count("eval in a child") == 2 and "goal MET" in rows(text, "trials")[-1]


def test_cli_shows_the_display_and_quiet_silences_it(tmp_path):
    tune = [sys.executable, "-m", "autoquant.cli", "tune", str(JOB), "--max-trials", "2", "--out"]
    text = in_terminal([*tune, str(tmp_path / "a")])
    assert rows(text, "calibration") and "2/2" in rows(text, "trials")[-1]
    quiet = in_terminal([*tune, str(tmp_path / "b"), "--quiet"])
    assert not rows(quiet, "trials") and "trial 0 (1/2)" not in quiet and "FP32 baseline" not in quiet
    assert "Wrote result.json" in quiet  # the summary stays


def test_adapters_report_each_calibration_batch():
    import torch
    from torch import nn

    from autoquant.adapters.fx import FXAdapter

    batches = [torch.randn(2, 4) for _ in range(3)]
    done: list[int] = []
    FXAdapter(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), batches).calibrate(on_batch=done.append)
    assert done == [1, 2, 3]


def test_probe_counts_scored_candidates_of_those_expected():
    adapter = FakeAdapter(fake_model(n_ops=3), [None])
    events: list[tuple[int, int | None]] = []
    probe = OutputProbe(adapter, adapter.space, on_score=lambda done, total: events.append((done, total)))
    configs = [QuantConfig(calibration="minmax", fp32_ops=frozenset(ops)) for ops in ((), ("op0",), ("op1",))]
    probe.expect(configs)
    for config in configs + configs[:1]:  # a candidate scored again is not counted again
        probe.score(config)
    assert events == [(1, 3), (2, 3), (3, 3)]


def test_trial_status_estimates_the_time_left_until_the_goal_is_met():
    study = optuna.create_study()
    study.set_user_attr("baseline", 1.0)
    for _ in range(2):  # two running trials: nothing measured yet
        study.ask()
    status = trial_status(study, max_trials=10, timeout=60.0, criterion=AccuracyCriterion(relative=0.01),
                          objective="accuracy", elapsed_s=1.0)
    assert status.line().startswith("progress: 2/10 trials; no result yet; goal not met yet; at most ~")
    assert status.stopped("timeout of 60 s reached").text() == (
        "no result yet; goal not met yet; stopped: timeout of 60 s reached")
    assert logging.getLogger("autoquant").handlers == []
