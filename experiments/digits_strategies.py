"""Trials each strategy needs on the digits CNN, at several relative criteria, in one run.

    python experiments/digits_strategies.py --criteria 0.01 0.001 --max-trials 40 --out experiments/results

Writes digits_strategies.csv and .md (one row per strategy x criterion).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd

from autoquant import AccuracyCriterion, Tuner
from autoquant.examples.digits import prepare
from autoquant.strategies import STRATEGIES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--criteria", type=float, nargs="+", default=[0.01, 0.001])
    parser.add_argument("--strategies", nargs="+", default=sorted(STRATEGIES))
    parser.add_argument("--max-trials", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="experiments/results")
    parser.add_argument("--fragile", action="store_true", help="the digits CNN with one outlier channel")
    args = parser.parse_args()

    data, model, eval_fn = prepare(seed=args.seed, fragile=args.fragile)
    calibration = data.calibration_batches()
    rows = []
    for relative in args.criteria:
        for strategy in args.strategies:
            start = time.perf_counter()
            result = Tuner(AccuracyCriterion(relative=relative), strategy=strategy,
                           max_trials=args.max_trials, seed=args.seed).tune(model, calibration, eval_fn)
            rows.append({
                "criterion": f"{relative:.2%} relative",
                "strategy": strategy,
                "met": result.met,
                "trials": result.trials,
                "evaluations": result.evaluations,
                "fp32_accuracy": result.baseline_accuracy,
                "int8_accuracy": result.accuracy,
                "relative_loss": result.relative_loss,
                "latency_ratio": result.latency_ratio,
                "ops_fp32": f"{len(result.fp32_ops)}/{result.quantizable_ops}",
                "config": result.config.describe(),
                "wall_s": time.perf_counter() - start,
            })
            print(rows[-1])
    table = pd.DataFrame(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "digits_fragile_strategies" if args.fragile else "digits_strategies"
    table.to_csv(out / f"{name}.csv", index=False)
    (out / f"{name}.md").write_text(table.to_markdown(index=False, floatfmt=".4g"))
    print(table.to_markdown(index=False, floatfmt=".4g"))


if __name__ == "__main__":
    main()
