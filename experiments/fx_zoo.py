"""The FX adapter on the structural zoo: space, builds, fallbacks and INT8/FP32 latency per model.

    python experiments/fx_zoo.py --size bench --models resnet,mobilenet_v2 --out experiments/results/fx_zoo_bench.md

For each model: ops in the space by type, Conv/Linear layers searched of all and unaccounted, space
build time, the median candidate build time (single-op fallbacks, after the first build of a qconfig
family), the all-FP32 build's largest difference from the FP32 model, the single-op fallbacks that
failed, and the INT8/FP32 latency ratio of the default (all-INT8) build, measured interleaved in
one process (median of per-round ratios).
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from autoquant import QuantConfig
from autoquant.adapters.fx import FXAdapter
from autoquant.examples.zoo import ZOO

WEIGHTED = (nn.Linear, nn.modules.conv._ConvNd)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="ci", choices=("ci", "bench"))
    parser.add_argument("--models", default=",".join(ZOO))
    parser.add_argument("--fallbacks", type=int, default=8, help="single-op fallbacks built per model")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved latency rounds")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    header = ("| model | ops | Conv/Linear searched | unaccounted | space s | build s (median) | all-FP32 max diff "
              "| failed fallbacks | INT8/FP32 latency |\n|---|---|---|---|---|---|---|---|---|")
    print(header, flush=True)
    rows = []
    for name in args.models.split(","):
        try:
            rows.append(row(name, args))
        except Exception as exc:  # a crash is a row of the table, not the end of it
            rows.append(f"| {name} | crashed: {type(exc).__name__}: {str(exc)[:200]} |")
        print(rows[-1], flush=True)
    table = "\n".join([header, *rows])
    if args.out:
        command = f"python experiments/fx_zoo.py --size {args.size} --models {args.models}"
        args.out.write_text(f"# FX adapter on the zoo ({args.size})\n\n`{command}`\n\n{table}\n")


def row(name: str, args: argparse.Namespace) -> str:
    case = ZOO[name].build(args.size)
    start = time.perf_counter()
    adapter = FXAdapter(case.model, case.calib_batches)
    space_s = time.perf_counter() - start
    adapter.calibrate()
    weighted = {n for n, m in case.model.named_modules() if isinstance(m, WEIGHTED)}
    ops = {op.name for op in adapter.space.ops}
    accounted = ops | {u.name for u in adapter.space.unsupported}
    kinds: dict[str, int] = {}
    for op in adapter.space.ops:
        kinds[op.op_type] = kinds.get(op.op_type, 0) + 1
    default = adapter.build(QuantConfig())
    everything = adapter.build(QuantConfig(fp32_ops=frozenset(ops)))
    with torch.inference_mode():
        diff = (output(everything, case.example) - output(case.model, case.example)).abs().max().item()
    names = adapter.space.op_names
    step = max(1, len(names) // args.fallbacks)
    times, failed = [], []
    for op in names[::step]:
        try:
            start = time.perf_counter()
            model = adapter.build(QuantConfig(fp32_ops=frozenset({op})))
            times.append(time.perf_counter() - start)
            with torch.inference_mode():
                output(model, case.example)
        except Exception as exc:  # a crash is what this table is for
            failed.append(f"{op}: {type(exc).__name__}")
    ratio = latency_ratio(default, case.model, case.example, args.rounds)
    held = " (held out)" if ZOO[name].held_out else ""
    return (f"| {name}{held} | {len(ops)} ({', '.join(f'{k} {v}' for k, v in sorted(kinds.items()))}) "
            f"| {len(weighted & ops)} of {len(weighted)} | {len(weighted - accounted)} | {space_s:.1f} "
            f"| {statistics.median(times):.2f} | {diff:.2g} "
            f"| {len(failed)}{': ' + '; '.join(failed) if failed else ''} "
            f"| {ratio:.2f} |")


def output(model: nn.Module, batch) -> torch.Tensor:
    out = model(**batch) if isinstance(batch, dict) else model(batch)
    return out.logits if hasattr(out, "logits") else out


def latency_ratio(int8: nn.Module, fp32: nn.Module, batch, rounds: int) -> float:
    """Median over rounds of INT8 time / FP32 time, the two measured back to back."""
    ratios = []
    with torch.inference_mode():
        for model in (int8, fp32):
            output(model, batch)  # warm-up
        for _ in range(rounds):
            timings = []
            for model in (int8, fp32):
                start = time.perf_counter()
                output(model, batch)
                timings.append(time.perf_counter() - start)
            ratios.append(timings[0] / timings[1])
    return statistics.median(ratios)


if __name__ == "__main__":
    main()
