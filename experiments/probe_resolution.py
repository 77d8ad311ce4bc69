"""Does the output probe tell which all-INT8 knob settings pass, and down to what goal?

For each benchmark case and seed, every all-INT8 knob setting of the case's static approach is scored by the
probe (no eval_fn, as the sensitivity strategy scores it) and evaluated by the case's eval_fn. Per
criterion, with passing and failing settings both present, the table gives the AUC of the probe's
error as a pass/fail ranking (1: every passing setting has a lower error than every failing one;
0.5: no better than chance), whether the setting the probe ranks first passes, and how many samples
the goal allows (a goal under one sample passes only a setting that loses none, net).

    python experiments/probe_resolution.py --seeds 0 1 --out experiments/results

Writes probe_resolution.csv (one row per case, seed and setting) and probe_resolution.md
(``--from-csv`` tabulates a CSV written before).
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from autoquant import AccuracyCriterion
from autoquant.adapters import adapter_for
from autoquant.criterion import metric_step
from autoquant.probe import OutputProbe

sys.path.insert(0, str(Path(__file__).parent))
import benchmark  # noqa: E402  (experiments/ is not a package)

CASES = ("digits", "digits-fragile", "digits-onnx", "digits-onnx-fragile", "dwcnn", "transformer", "mlp")
# (the minilm cases, Spearman on STS-B, run too: --models minilm-sts)
CRITERIA = (0.01, 0.005, 0.001)


def settings(case: benchmark.Case, seed: int) -> pd.DataFrame:
    """Probe error, top-1 agreement and measured accuracy of every static all-INT8 knob setting, with the baseline."""
    backend = adapter_for(case.model)(case.model, case.calibration)
    backend.calibrate()
    space = backend.space.restrict(case.restrict) if case.restrict else backend.space
    probe = OutputProbe(backend, space)
    baseline = case.eval_fn(backend.fp32_model)
    rows = []
    for config in space.knob_configs():  # the static approach's: INT8 kernels of one speed, settings apart
        if config.approach != "static":
            continue
        config = space.canonical(config)
        score = probe.score(config)
        rows.append({"model": case.name, "held_out": case.held_out, "seed": seed, "setting": config.describe(),
                     "probe_error": score.error, "top1_agreement": score.top1_agreement,
                     "accuracy": case.eval_fn(backend.build(space.resolve(config))), "baseline": baseline})
    return pd.DataFrame(rows)


def verdicts(frame: pd.DataFrame) -> pd.DataFrame:
    """Per case, seed and criterion: samples the goal allows, settings passing, the probe's AUC and first pick."""
    out = []
    steps = {model: _step(group) for model, group in frame.groupby("model")}  # a case's test split: one size
    for (model, held_out, seed), group in frame.groupby(["model", "held_out", "seed"], sort=False):
        baseline, step = float(group["baseline"].iloc[0]), steps[model]
        errors = group["probe_error"].to_numpy()
        for relative in CRITERIA:
            allowed = AccuracyCriterion(relative=relative).allowed(baseline)
            passed = (baseline - group["accuracy"]) <= allowed + 1e-12
            ok, bad = errors[passed.to_numpy()], errors[~passed.to_numpy()]
            auc = (np.mean([(a < b) + 0.5 * (a == b) for a, b in itertools.product(ok, bad)])
                   if len(ok) and len(bad) else None)
            out.append({"model": model, "held_out": held_out, "seed": seed, "criterion": f"{relative:.2%}",
                        "samples": round(1 / step) if step else None,
                        "samples_allowed": allowed / step if step else None,
                        "passing": f"{int(passed.sum())}/{len(group)}", "pass_share": float(passed.mean()), "auc": auc,
                        "probe_first_passes": bool(passed.iloc[int(np.argmin(errors))])})
    return pd.DataFrame(out)


def _step(group: pd.DataFrame) -> float | None:
    """The case's metric step, if it counts samples: coarser than its finest goal, else up to 10x finer."""
    values = [*group["baseline"], *group["accuracy"]]
    finest = AccuracyCriterion(relative=min(CRITERIA)).allowed(float(group["baseline"].min()))
    return metric_step(values, below=finest) or metric_step(values, below=finest / 10)


def summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per criterion, over the rows where both verdicts occur: the probe's AUC and first-pick hits."""
    mixed = table.dropna(subset=["auc"]).assign(under_one_sample=lambda t: t["samples_allowed"] < 1)
    order = {f"{relative:.2%}": i for i, relative in enumerate(CRITERIA)}
    return (mixed.groupby("criterion")
            .agg(rows=("auc", "size"), goal_under_one_sample=("under_one_sample", "sum"),
                 median_pass_share=("pass_share", "median"), median_auc=("auc", "median"),
                 min_auc=("auc", "min"), max_auc=("auc", "max"), probe_first_passes=("probe_first_passes", "mean"))
            .reset_index().sort_values("criterion", key=lambda c: c.map(order), ignore_index=True))


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(CASES), choices=benchmark.CASES)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--out", default="experiments/results", help="tables; trained models in <out>/cache, "
                        "as the benchmark's (the same --out: the same models)")
    parser.add_argument("--from-csv", help="tabulate a probe_resolution.csv written before instead of measuring")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    frame = (pd.read_csv(args.from_csv) if args.from_csv else
             pd.concat([settings(case, seed) for seed in args.seeds
                        for case in benchmark.build_cases(args.models, seed, Path(args.out) / "cache")]))
    table = verdicts(frame)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out / "probe_resolution.csv", index=False)
    command = "python experiments/probe_resolution.py " + " ".join(argv if argv is not None else sys.argv[1:])
    done = f"{time.perf_counter() - start:.0f} s" if not args.from_csv else "tabulated from a measured CSV"
    (out / "probe_resolution.md").write_text(
        f"Command: `{command}` ({done})\n\n## Summary\n\n"
        f"{summary(table).to_markdown(index=False, floatfmt='.2f')}\n\n## Per case\n\n"
        f"{table.to_markdown(index=False, floatfmt='.2f')}\n")
    print(summary(table).to_string(index=False))
    return table


if __name__ == "__main__":
    main()
