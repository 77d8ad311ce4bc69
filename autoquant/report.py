"""Human-readable views: the space before a job, the history table, the summary after it."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import optuna
import pandas as pd
from rich.console import Console
from rich.table import Table

from autoquant.plots import main_ranking
from autoquant.result import TuneResult, counts_text
from autoquant.space import ALL_KNOBS, KNOBS, QuantConfig, Space
from autoquant.trials import MEASUREMENT_KEYS, records

HISTORY_COLUMNS = [
    "trial", "state", "accuracy", "loss", "passed", "latency_ratio", "n_fp32", *ALL_KNOBS, "op_calibration", "fp32_ops",
    "config", "outcome", "latency_precision", "latency_ms", "fp32_latency_ms", "build_s", "eval_s", "duplicate_of",
    "error",
]
assert set(MEASUREMENT_KEYS) <= set(HISTORY_COLUMNS)


def describe_space(space: Space, adapter: str) -> str:
    """A few lines saying what will be searched and what stays FP32 regardless."""
    by_type = Counter(op.op_type for op in space.ops)
    lines = [
        f"{adapter} adapter: {len(space.ops)} quantizable op(s) "
        f"({', '.join(f'{n} {t}' for t, n in by_type.items()) or 'none'}); {space.size():,} candidates.",
        "  knobs: " + "; ".join(f"{k}={'|'.join(space.choices(k))}" for k in KNOBS)
        + (f"; smooth_alpha={'|'.join('off' if a is None else f'{a:g}' for a in space.smooth_alphas)}"
           if space.smooth_alphas != (None,) else "")
        + (f"; fallback={'|'.join(space.fallbacks)} (bf16: {len(space.bf16_ops())} op(s) measured faster in BF16)"
           if len(space.fallbacks) > 1 else ""),
    ]
    if space.unsupported:
        counts = space.op_counts(space.default_config())
        lines.append("  whole model: " + "; ".join(
            f"{c.total} {c.op_type} ({c.total - c.unsupported} in the space)" for c in counts))
    if space.fixed_fp32:
        lines.append(f"  kept FP32 by request: {', '.join(sorted(space.fixed_fp32))}")
    for unsupported in space.unsupported:
        lines.append(f"  stays FP32: {unsupported.name} ({unsupported.op_type}): {unsupported.reason}")
    return "\n".join(lines)


def config_text(config: QuantConfig) -> str:
    """The knobs, then the per-op calibration overrides: "static/minmax/asymmetric/per_channel +entropy@conv2"."""
    overrides = " ".join(f"+{method}@{op}" for op, method in config.op_calibration.items())
    return f"{config.describe()} {overrides}".strip()


def history_frame(trials: Sequence[optuna.trial.FrozenTrial]) -> pd.DataFrame:
    """One row per trial, in trial order (trial numbers are Optuna's, as in the log)."""
    rows = []
    for t in records(trials):
        config = t.config.to_dict() if t.config else {}
        rows.append({
            "trial": t.number,
            "state": t.state.name,
            "outcome": t.outcome,
            **(t.measurement.to_attrs() if t.measurement else {}),
            **{k: getattr(t.config, k) if t.config else None for k in ALL_KNOBS},
            "op_calibration": " ".join(f"{op}={m}" for op, m in config.get("op_calibration", {}).items()),
            "fp32_ops": " ".join(config.get("fp32_ops", [])),
            "config": config_text(t.config) if t.config else None,
            "duplicate_of": t.duplicate_of,
            "error": t.error,
        })
    return pd.DataFrame(rows, columns=HISTORY_COLUMNS)


def summary_table(result: TuneResult) -> Table:
    """The table a finished job prints."""
    verdict = "MET" if result.met else "NOT met"
    if result.slower_than_fp32:
        verdict += ", but SLOWER than FP32"
    table = Table(title=f"autoquant: goal {verdict} ({result.criterion.describe()})")
    table.add_column("")
    table.add_column("value", justify="right")
    rows = [
        ("FP32 accuracy", f"{result.baseline_accuracy:.6g}"),
        ("INT8 accuracy", f"{result.accuracy:.6g}"),
        ("relative loss", f"{result.relative_loss:+.3%}"),
        ("latency ratio (INT8/FP32)", f"{result.latency_ratio:.3f}"
         + (f" +-{result.latency_precision:.0%}" if result.latency_precision is not None else "")
         + ("  SLOWER than FP32: no passing candidate was faster" if result.slower_than_fp32 else "")),
        ("quantized (whole model)", counts_text(result.op_counts)),
        ("searched ops left in FP32", f"{len(result.fp32_ops)} of {result.quantizable_ops}"
         + (f": {', '.join(result.fp32_ops[:6])}{' ...' if len(result.fp32_ops) > 6 else ''}"
            if result.fp32_ops else "")),
        ("config", config_text(result.config)),
        ("trials (eval_fn calls)", f"{result.trials} ({result.evaluations})"),
        ("time", f"{result.elapsed_s:.1f} s"),
    ]
    if result.metric_step is not None:
        allowed = result.criterion.allowed(result.baseline_accuracy)
        rows.append(("goal vs metric step", f"the goal allows {allowed:.3g}, less than one step of the metric "
                                            f"({result.metric_step:.3g}): single samples decide pass or fail"))
    rows += [(f"trial {number} FAILED", error) for number, error in sorted(result.failed_trials.items())]
    for name, value in rows:
        table.add_row(name, value)
    return table


def print_summary(result: TuneResult, console: Console | None = None) -> None:
    (console or Console()).print(summary_table(result))


def sensitivity_table(ranking: pd.DataFrame, fp32_ops: Sequence[str] = (), limit: int = 15) -> Table:
    """The per-op sensitivity ranking (the main profile's), most sensitive first; ``fp32_ops`` are marked."""
    ranking = main_ranking(ranking)
    table = Table(title=f"op sensitivity ({ranking['measure'].iloc[0]} measure: share of the probe's output error)")
    for column in ("rank", "op", "type", "sensitivity", "calibration", "in result"):
        table.add_column(column, justify="right" if column in ("rank", "sensitivity") else "left")
    for row in ranking.head(limit).itertuples(index=False):
        table.add_row(str(row.rank), row.op, row.op_type, f"{row.sensitivity:.3g}", row.calibration or "-",
                      "FP32" if row.op in fp32_ops else "INT8")
    more = f"; {len(ranking) - limit} more op(s) in sensitivity.csv" if len(ranking) > limit else ""
    table.caption = ("calibration: the method of the all-INT8 candidate each op was measured against (the "
                     f"ranking's reference; not the op's own setting in the result){more}")
    return table

