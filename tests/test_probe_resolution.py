"""experiments/probe_resolution.py's verdicts: how many samples a goal allows, and the probe's AUC."""

import pandas as pd
import pytest

from experiments import probe_resolution as pr

SAMPLES = 597


def _frame(nets: list[int], errors: list[float]) -> pd.DataFrame:
    """One case and seed: settings that lost ``nets`` samples of 597 (negative: gained), with these probe errors."""
    baseline = 580 / SAMPLES
    return pd.DataFrame({"model": "m", "held_out": False, "seed": 0, "setting": [f"s{i}" for i in range(len(nets))],
                         "probe_error": errors, "top1_agreement": 1.0,
                         "accuracy": [(580 - n) / SAMPLES for n in nets], "baseline": baseline})


def test_the_goal_is_counted_in_samples_and_a_perfect_ranking_scores_one() -> None:
    table = pr.verdicts(_frame([0, -1, 1, 2, 5, 9, 12], [1e-4, 2e-4, 3e-4, 4e-4, 5e-4, 6e-4, 7e-4]))
    by_goal = table.set_index("criterion")
    assert (by_goal["samples"] == SAMPLES).all()
    assert by_goal.loc["0.10%", "samples_allowed"] == pytest.approx(0.58, abs=0.01)  # 0.1% of 580 samples
    assert by_goal.loc["1.00%", "samples_allowed"] == pytest.approx(5.8, abs=0.01)
    assert by_goal.loc["0.10%", "passing"] == "2/7"  # lost none, net
    assert by_goal.loc["1.00%", "passing"] == "5/7"
    assert by_goal.loc["0.10%", "auc"] == 1.0 and by_goal.loc["0.10%", "probe_first_passes"]


def test_a_reversed_ranking_scores_zero_and_the_summary_counts_goals_under_one_sample() -> None:
    table = pr.verdicts(_frame([0, -1, 1, 2, 5, 9, 12], [7e-4, 6e-4, 5e-4, 4e-4, 3e-4, 2e-4, 1e-4]))
    by_goal = table.set_index("criterion")
    assert by_goal.loc["0.10%", "auc"] == 0.0 and not by_goal.loc["0.10%", "probe_first_passes"]
    summary = pr.summary(table).set_index("criterion")
    assert list(summary.index) == ["1.00%", "0.50%", "0.10%"]
    assert summary["goal_under_one_sample"].tolist() == [0, 0, 1]
    assert (summary["median_auc"] == 0.0).all()
