"""Plots of a study's trials (matplotlib, Agg: no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from autoquant.criterion import AccuracyCriterion  # noqa: E402


def plot_history(history: pd.DataFrame, directory: Path, *, baseline: float, criterion: AccuracyCriterion,
                 chosen: int | None = None) -> list[Path]:
    """``trials.png`` (accuracy and latency ratio per trial) and ``tradeoff.png`` (accuracy vs
    latency, the criterion's threshold as a line and the chosen trial marked)."""
    directory.mkdir(parents=True, exist_ok=True)
    done = history[history["accuracy"].notna()]
    threshold = _threshold(baseline, criterion)
    written = []

    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(8, 6))
    colors = ["tab:green" if p else "tab:red" for p in done["passed"]]
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
    written.append(_save(fig, directory / "trials.png"))

    fig, ax = plt.subplots(figsize=(7, 5))
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
    written.append(_save(fig, directory / "tradeoff.png"))
    return written


def _threshold(baseline: float, criterion: AccuracyCriterion) -> float:
    """The worst accuracy that still passes."""
    allowed = criterion.tolerance * (abs(baseline) if criterion.kind == "relative" else 1.0)
    return baseline - allowed if criterion.higher_is_better else baseline + allowed


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
