"""An unattended sweep: models x strategies x criteria x seeds, one table and plots at the end.

Each run is a YAML job (from ``jobs:``) with its strategy, criterion and seed replaced, and its own
study (SQLite) in ``OUTPUT/runs/NAME/``: a sweep killed at any point and started again skips the
finished runs and continues the interrupted one where it stopped. Writes ``sweep.csv``,
``summary.md`` and ``sweep-*.png`` into ``OUTPUT``.

    python experiments/sweep.py experiments/sweep.yaml
"""

import argparse
import itertools
import json
import logging
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import optuna  # noqa: E402
import pandas as pd  # noqa: E402
import yaml  # noqa: E402
from pydantic import BaseModel, ConfigDict, Field  # noqa: E402
from rich.console import Console  # noqa: E402

from autoquant.cli import run_job  # noqa: E402
from autoquant.config import CriterionSpec, LoadedJob, StrategySpec, load_job  # noqa: E402
from autoquant.errors import AutoquantError, ConfigError  # noqa: E402

ROW_FILE = "sweep-row.json"
log = logging.getLogger("autoquant")


class Sweep(BaseModel):
    model_config = ConfigDict(extra="forbid")

    jobs: dict[str, str]  # model label -> job YAML (relative to the sweep file)
    strategies: list[str]
    criteria: list[CriterionSpec]
    seeds: list[int] = Field(default_factory=lambda: [0])
    max_trials: int = Field(30, ge=1)
    timeout: float | None = Field(None, gt=0)  # per run, seconds
    output: str = "autoquant-out/sweep"


def load_sweep(path: Path) -> tuple[Sweep, Path]:
    try:
        sweep = Sweep.model_validate(yaml.safe_load(path.read_text()))
    except Exception as exc:
        raise ConfigError(f"{path}: {exc}") from None
    for strategy in sweep.strategies:
        StrategySpec(name=strategy)  # unknown names fail here, before hours of work
    out = Path(sweep.output)
    return sweep, (out if out.is_absolute() else path.parent / out).resolve()


def criterion_label(c: CriterionSpec) -> str:
    return f"rel{c.relative:g}" if c.relative is not None else f"abs{c.absolute:g}"


def plan(sweep: Sweep, base: Path, out: Path) -> list[tuple[dict[str, Any], LoadedJob]]:
    runs = []
    for (model, job_path), strategy, crit, seed in itertools.product(
            sweep.jobs.items(), sweep.strategies, sweep.criteria, sweep.seeds):
        job = load_job(base / job_path)
        name = f"{model}-{strategy}-{criterion_label(crit)}-s{seed}"
        spec = job.spec.model_copy(update={
            "name": name, "criterion": crit, "storage": None,
            "strategy": StrategySpec(name=strategy, max_trials=sweep.max_trials, timeout=sweep.timeout, seed=seed),
        })
        loaded = LoadedJob(spec, job.path)
        loaded.output = out / "runs" / name
        runs.append(({"model": model, "strategy": strategy, "criterion": criterion_label(crit), "seed": seed}, loaded))
    return runs


def run_one(keys: dict[str, Any], job: LoadedJob, console: Console) -> dict[str, Any]:
    row_file = job.output / ROW_FILE
    if row_file.exists():
        log.info("sweep: %s already done", job.name)
        return json.loads(row_file.read_text())
    try:
        # Runs of one model share its calibration statistics (the model is the same job every time).
        result = run_job(job, console, stats_cache=job.output.parent.parent / "cache" / f"{keys['model']}.json")
    except Exception as exc:  # unattended: one broken run must not stop the night
        log.error("sweep: %s failed: %s\n%s", job.name, exc, traceback.format_exc())
        return {**keys, "error": f"{type(exc).__name__}: {exc}"}
    study = optuna.load_study(study_name=job.name, storage=job.storage())
    trials = study.get_trials(deepcopy=False)
    counted = [t for t in trials if not t.user_attrs.get("stale") and "collision_of" not in t.user_attrs]
    first_pass = next((i + 1 for i, t in enumerate(counted) if t.user_attrs.get("passed")), None)
    starts = [t.datetime_start for t in trials if t.datetime_start]
    ends = [t.datetime_complete for t in trials if t.datetime_complete]
    row = {
        **keys,
        "met": result.met,
        "trials": len(counted),
        "trials_to_meet": first_pass,
        "evaluations": result.evaluations,
        "baseline": result.baseline_accuracy,
        "accuracy": result.accuracy,
        "relative_loss": result.relative_loss,
        "latency_ratio": result.latency_ratio,
        "fp32_ops": len(result.fp32_ops),
        "config": result.config.describe(),
        "search_s": (max(ends) - min(starts)).total_seconds() if starts and ends else None,
    }
    row_file.write_text(json.dumps(row, indent=2))
    return row


def summarise(table: pd.DataFrame) -> str:
    ok = table[table["met"].notna()] if "met" in table else table.iloc[0:0]
    by_strategy = ok.groupby("strategy").agg(
        runs=("met", "size"), met=("met", "sum"), median_trials_to_meet=("trials_to_meet", "median"),
        median_trials=("trials", "median"), median_latency_ratio=("latency_ratio", "median"),
        median_search_s=("search_s", "median"))
    by_model = ok.groupby("model").agg(
        runs=("met", "size"), met=("met", "sum"), baseline=("baseline", "first"),
        median_accuracy=("accuracy", "median"),
        median_latency_ratio=("latency_ratio", "median"), best_latency_ratio=("latency_ratio", "min"))
    text = ["# Sweep summary", "", "## By strategy", "", by_strategy.to_markdown(floatfmt=".4g"), "",
            "## By model", "", by_model.to_markdown(floatfmt=".4g"), "", "## All runs", "",
            table.to_markdown(index=False, floatfmt=".4g"), ""]
    return "\n".join(text)


def plot(table: pd.DataFrame, out: Path) -> list[Path]:
    ok = table[table["met"].notna()] if "met" in table else table.iloc[0:0]
    paths = [_bars(ok, "trials_to_meet", "mean", "trials to meet the criterion (mean; missing = never met)",
                   "trials needed per strategy", out / "sweep-trials-to-meet.png")]

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    for model, group in ok.groupby("model"):
        left.scatter(group["strategy"], group["latency_ratio"], label=model, s=30)
        right.scatter(group["strategy"], group["accuracy"] - group["baseline"], label=model, s=30)
    left.set_ylabel("final latency ratio INT8/FP32")
    right.set_ylabel("final accuracy minus FP32 accuracy")
    left.legend(fontsize=8)
    fig.suptitle("final result per model and strategy")
    fig.tight_layout()
    paths.append(out / "sweep-latency-accuracy.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    paths.append(_bars(ok, "search_s", "sum", "search wall time, s (sum over runs)", "wall time",
                       out / "sweep-wall-time.png"))
    return paths


def _bars(table: pd.DataFrame, values: str, aggfunc: str, ylabel: str, title: str, path: Path) -> Path:
    """One bar per strategy and model."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    pivot = table.pivot_table(index="strategy", columns="model", values=values, aggfunc=aggfunc)
    if not pivot.empty:
        pivot.plot.bar(ax=ax, rot=0)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep", type=Path, help="the sweep YAML")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    console = Console()
    try:
        sweep, out = load_sweep(args.sweep)
        runs = plan(sweep, args.sweep.parent, out)
    except AutoquantError as exc:
        console.print(f"error: {exc}")
        return 2
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    rows = []
    for i, (keys, job) in enumerate(runs, 1):
        log.info("sweep: run %d/%d: %s (%.0f s so far)", i, len(runs), job.name, time.perf_counter() - start)
        rows.append(run_one(keys, job, console))
    table = pd.DataFrame(rows)
    table.to_csv(out / "sweep.csv", index=False)
    summary = summarise(table)
    (out / "summary.md").write_text(summary)
    plot(table, out)
    console.print(summary)
    console.print(f"Sweep of {len(runs)} runs finished in {time.perf_counter() - start:.0f} s; wrote sweep.csv, "
                  f"summary.md and sweep-*.png to {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
