"""The Python API shows progress by default (issue 11, point 9), and leaves logging as it found it."""

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


def test_verbose_false_is_silent():
    assert "autoquant:" not in run(", verbose=False")
