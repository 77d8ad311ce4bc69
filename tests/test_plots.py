"""The plots are written as PNGs and leave the caller's matplotlib as it was."""

import subprocess
import sys

SCRIPT = """
import matplotlib
matplotlib.use("svg")
from pathlib import Path
import pandas as pd
from autoquant import AccuracyCriterion
from autoquant.plots import plot_history, plot_sensitivity
out = Path(sys.argv[1])
history = pd.DataFrame({"trial": [0, 1], "accuracy": [0.9, 0.8], "passed": [True, False], "latency_ratio": [0.5, 0.4]})
written = plot_history(history, out, baseline=0.91, criterion=AccuracyCriterion(relative=0.05), chosen=0)
ranking = pd.DataFrame({"op": ["a", "b"], "sensitivity": [0.1, 0.01], "measure": ["int8", "int8"]})
written.append(plot_sensitivity(ranking, out / "sensitivity.png", fp32_ops=["a"]))
assert all(p.read_bytes()[:4] == b"\\x89PNG" for p in written), written
assert matplotlib.get_backend() == "svg", matplotlib.get_backend()
assert "matplotlib.pyplot" not in sys.modules
"""


def test_plots_write_pngs_without_switching_the_backend(tmp_path):
    command = [sys.executable, "-c", "import sys\n" + SCRIPT, str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sensitivity.png", "tradeoff.png", "trials.png"]
