"""The Python API shows progress by default (issue 11, point 9), and leaves logging as it found it."""

import logging
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = """
import logging
from autoquant import Tuner
from tests.fake_adapter import FakeAdapter, accuracy, fake_model
Tuner(max_trials=3).tune(fake_model(n_ops=3, sensitive={{1: 0.5}}), [None], accuracy, adapter=FakeAdapter{extra})
assert not logging.getLogger("autoquant").handlers and logging.getLogger("autoquant").level == logging.NOTSET
"""


def run(extra: str = "") -> str:
    done = subprocess.run([sys.executable, "-c", SCRIPT.format(extra=extra)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stderr


def test_tune_prints_its_progress_without_any_logging_setup():
    err = run()
    assert "autoquant: FP32 baseline" in err and "trial 0" in err
    # a progress line per trial: trials done of the budget, best so far, time left, elapsed
    assert "autoquant: progress: 1/3 trials; best trial 0" in err and " s elapsed" in err


def test_progress_estimates_the_time_left_until_the_goal_is_met():
    import optuna

    from autoquant.criterion import AccuracyCriterion
    from autoquant.progress import Progress

    study = optuna.create_study()
    study.set_user_attr("baseline", 1.0)
    for _ in range(2):  # two running trials: nothing measured yet
        study.ask()
    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logging.getLogger("autoquant").addHandler(handler)
    logging.getLogger("autoquant").setLevel(logging.INFO)
    try:
        Progress(10, 60.0, AccuracyCriterion(relative=0.01))(study, study.trials[-1])
    finally:
        logging.getLogger("autoquant").removeHandler(handler)
        logging.getLogger("autoquant").setLevel(logging.NOTSET)
    assert lines and lines[0].startswith("progress: 2/10 trials; no result yet; goal not met yet; at most ~")


def test_verbose_false_is_silent():
    assert "autoquant:" not in run(", verbose=False")
