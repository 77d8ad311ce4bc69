"""Plots of a study's trials and of a sensitivity ranking, written as PNG files.

Figures are built with matplotlib's object API (``Figure``), never pyplot: no backend is switched
and no global figure state is touched, so the caller's own plotting is left as it was.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from autoquant.criterion import AccuracyCriterion


def plot_history(history: pd.DataFrame, directory: Path, *, baseline: float, criterion: AccuracyCriterion,
                 chosen: int | None = None) -> list[Path]:
    """``trials.png`` (accuracy and latency ratio per trial) and ``tradeoff.png`` (accuracy vs
    latency, the criterion's threshold as a line and the chosen trial marked)."""
    directory.mkdir(parents=True, exist_ok=True)
    done = history[history["accuracy"].notna()]
    threshold = _threshold(baseline, criterion)
    colors = ["tab:green" if p else "tab:red" for p in done["passed"]]
    return [_trials(done, colors, baseline, threshold, directory / "trials.png"),
            _tradeoff(done, colors, baseline, threshold, criterion, chosen, directory / "tradeoff.png")]


def _trials(done: pd.DataFrame, colors: list[str], baseline: float, threshold: float, path: Path) -> Path:
    fig = Figure(figsize=(8, 6))
    top, bottom = fig.subplots(2, 1, sharex=True)
    top.scatter(done["trial"], done["accuracy"], c=colors, s=18)
    top.axhline(baseline, color="gray", lw=1, label="FP32")
    top.axhline(threshold, color="black", ls="--", lw=1, label="criterion")
    top.set_ylabel("accuracy")
    top.legend(loc="lower right")
    bottom.scatter(done["trial"], done["latency_ratio"], c=colors, s=18)
    bottom.axhline(1.0, color="gray", lw=1)
    bottom.set_ylabel("latency INT8/FP32")
    bottom.set_xlabel("trial")
    fig.suptitle("trials (green: meets the criterion)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def _tradeoff(done: pd.DataFrame, colors: list[str], baseline: float, threshold: float,
              criterion: AccuracyCriterion, chosen: int | None, path: Path) -> Path:
    fig = Figure(figsize=(7, 5))
    ax = fig.subplots()
    ax.scatter(done["latency_ratio"], done["accuracy"], c=colors, s=18)
    ax.axhline(threshold, color="black", ls="--", lw=1, label=f"criterion: {criterion.describe()}")
    ax.axhline(baseline, color="gray", lw=1, label="FP32")
    if chosen is not None and chosen in set(done["trial"]):
        row = done[done["trial"] == chosen].iloc[0]
        ax.scatter([row["latency_ratio"]], [row["accuracy"]], marker="*", s=250, color="gold",
                   edgecolor="black", zorder=3, label=f"chosen (trial {chosen})")
    ax.set_xlabel("latency INT8/FP32 (lower is faster)")
    ax.set_ylabel("accuracy")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def main_ranking(ranking: pd.DataFrame) -> pd.DataFrame:
    """The rows of the ranking's first profile: where approaches were profiled apart, an op has a row in each."""
    if "approach" not in ranking or ranking.empty:
        return ranking
    return ranking[ranking["approach"] == ranking["approach"].iloc[0]]


def plot_sensitivity(ranking: pd.DataFrame, path: Path, *, fp32_ops: Sequence[str] = ()) -> Path:
    """A horizontal bar per op (log scale), most sensitive on top; ops left in FP32 in red (the
    main profile's ranking)."""
    shown = main_ranking(ranking).head(40).iloc[::-1]
    fig = Figure(figsize=(7, 1.2 + 0.25 * len(shown)))
    ax = fig.subplots()
    colors = ["tab:red" if op in fp32_ops else "tab:blue" for op in shown["op"]]
    ax.barh(shown["op"], shown["sensitivity"].clip(lower=1e-12), color=colors)
    ax.set_xscale("log")
    ax.set_xlabel(f"sensitivity ({ranking['measure'].iloc[0]} measure; red: left in FP32)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def _threshold(baseline: float, criterion: AccuracyCriterion) -> float:
    """The worst accuracy that still passes."""
    allowed = criterion.tolerance * (abs(baseline) if criterion.kind == "relative" else 1.0)
    return baseline - allowed if criterion.higher_is_better else baseline + allowed
