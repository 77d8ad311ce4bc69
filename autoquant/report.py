"""Human-readable views: the space before a job, the history table, the summary after it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import optuna
import pandas as pd
from rich.console import Console
from rich.table import Table

from autoquant.space import KNOBS, Space

if TYPE_CHECKING:
    from autoquant.result import TuneResult

HISTORY_COLUMNS = [
    "trial", "state", "accuracy", "loss", "passed", "latency_ratio", "n_fp32", *KNOBS, "fp32_ops",
    "latency_ms", "fp32_latency_ms", "build_s", "eval_s", "duplicate_of", "error",
]


def describe_space(space: Space, adapter: str) -> str:
    """A few lines saying what will be searched and what stays FP32 regardless."""
    by_type: dict[str, int] = {}
    for op in space.ops:
        by_type[op.op_type] = by_type.get(op.op_type, 0) + 1
    lines = [
        f"{adapter} adapter: {len(space.ops)} quantizable op(s) "
        f"({', '.join(f'{n} {t}' for t, n in by_type.items()) or 'none'}); {space.size():,} candidates.",
        "  knobs: " + "; ".join(f"{k}={'|'.join(space.choices(k))}" for k in KNOBS),
    ]
    if space.fixed_fp32:
        lines.append(f"  kept FP32 by request: {', '.join(sorted(space.fixed_fp32))}")
    for unsupported in space.unsupported:
        lines.append(f"  stays FP32: {unsupported.name} ({unsupported.op_type}): {unsupported.reason}")
    return "\n".join(lines)


def history_frame(trials: Sequence[optuna.trial.FrozenTrial]) -> pd.DataFrame:
    """One row per trial, in trial order."""
    rows = []
    for t in trials:
        attrs = t.user_attrs
        config = attrs.get("config", {})
        rows.append({
            "trial": t.number,
            "state": t.state.name,
            **{k: attrs.get(k) for k in ("accuracy", "loss", "passed", "latency_ratio", "n_fp32")},
            **{k: config.get(k) for k in KNOBS},
            "fp32_ops": " ".join(config.get("fp32_ops", [])),
            **{k: attrs.get(k)
               for k in ("latency_ms", "fp32_latency_ms", "build_s", "eval_s", "duplicate_of", "error")},
        })
    return pd.DataFrame(rows, columns=HISTORY_COLUMNS)


def summary_table(result: TuneResult) -> Table:
    """The table a finished job prints."""
    table = Table(title=f"autoquant: goal {'MET' if result.met else 'NOT met'} ({result.criterion.describe()})")
    table.add_column("")
    table.add_column("value", justify="right")
    rows = [
        ("FP32 accuracy", f"{result.baseline_accuracy:.6g}"),
        ("INT8 accuracy", f"{result.accuracy:.6g}"),
        ("relative loss", f"{result.relative_loss:+.3%}"),
        ("latency ratio (INT8/FP32)", f"{result.latency_ratio:.3f}"),
        ("ops left in FP32", f"{len(result.fp32_ops)} of {result.quantizable_ops}" + (
            f": {', '.join(result.fp32_ops[:6])}{' ...' if len(result.fp32_ops) > 6 else ''}"
            if result.fp32_ops else "")),
        ("config", result.config.describe()),
        ("trials (eval_fn calls)", f"{result.trials} ({result.evaluations})"),
        ("time", f"{result.elapsed_s:.1f} s"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    return table


def print_summary(result: TuneResult, console: Console | None = None) -> None:
    (console or Console()).print(summary_table(result))


def sensitivity_table(ranking: pd.DataFrame, fp32_ops: Sequence[str] = (), limit: int = 15) -> Table:
    """The per-op sensitivity ranking, most sensitive first; ``fp32_ops`` are marked."""
    table = Table(title=f"op sensitivity ({ranking['measure'].iloc[0]} measure: share of the probe's output error)")
    for column in ("rank", "op", "type", "sensitivity", "calibration", "in result"):
        table.add_column(column, justify="right" if column in ("rank", "sensitivity") else "left")
    for row in ranking.head(limit).itertuples(index=False):
        table.add_row(str(row.rank), row.op, row.op_type, f"{row.sensitivity:.3g}", row.calibration or "-",
                      "FP32" if row.op in fp32_ops else "INT8")
    if len(ranking) > limit:
        table.caption = f"{len(ranking) - limit} more op(s) in sensitivity.csv"
    return table

