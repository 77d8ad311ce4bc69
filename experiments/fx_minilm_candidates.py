"""Fixed FX candidates of all-MiniLM-L6-v2: dev (and test) Spearman loss and latency ratio vs FP32 eager.

Each candidate is built from one FXAdapter (256 sts-train calibration sentences); accuracy is
Spearman on all 1,500 sts-dev pairs (``--test``: and the 1,379 sts-test pairs); latency is
``measure_ratio`` (interleaved pairs, median) at batch 32 x sequence 128, under ``--lock``'s flock
when given. Time it alone:

    python experiments/fx_minilm_candidates.py --test --lock /work/timing.lock      # every candidate
    python experiments/fx_minilm_candidates.py --no-latency static-adds-fp32        # accuracy only
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from autoquant.adapters.fx import FXAdapter
from autoquant.examples import text
from autoquant.latency import measure_ratio, timing_lock
from autoquant.space import QuantConfig

STS_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "stsbenchmark"


def candidates(adapter: FXAdapter) -> dict[str, QuantConfig]:
    adds = frozenset(op.name for op in adapter.space.ops if op.op_type == "add")
    bf16 = adapter.space.bf16_ops()  # the Linears measured faster as a BF16 fallback (1536->384 here)
    return {
        "dynamic": QuantConfig(approach="dynamic"),
        "dynamic-bf16-fallback": QuantConfig(approach="dynamic", fp32_ops=bf16, fallback="bf16"),
        "static": QuantConfig(),
        "static-adds-fp32": QuantConfig(fp32_ops=adds),
        "static-adds-fp32-bf16-fallback": QuantConfig(fp32_ops=adds | bf16, fallback="bf16"),
        "static-smooth0.5-adds-fp32": QuantConfig(fp32_ops=adds, smooth_alpha=0.5),
        "static-entropy": QuantConfig(calibration="entropy"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="candidates to run (default: all)")
    parser.add_argument("--no-latency", action="store_true")
    parser.add_argument("--no-accuracy", action="store_true")
    parser.add_argument("--test", action="store_true", help="also score sts-test")
    parser.add_argument("--lock", default=None, help="a file to flock while timing (a shared machine)")
    args = parser.parse_args()
    model = text.load_minilm()
    sentences = text.train_sentences(STS_DIR, 256)
    np.random.default_rng(0).shuffle(sentences)
    adapter = FXAdapter(model, text.torch_batches(text.encode(sentences, 32)))
    splits = {name: text.read_sts(STS_DIR, name) for name in (("dev", "test") if args.test else ("dev",))}
    batches = {name: split.batches() for name, split in splits.items()}
    fp32 = {} if args.no_accuracy else {name: split.spearman(text.TorchSession(model), batches[name])
                                        for name, split in splits.items()}
    print(f"FP32 {fp32}; BF16-faster Linears: {sorted(adapter.space.bf16_ops())}", flush=True)
    ids = torch.from_numpy(np.random.default_rng(0).integers(1000, 30000, size=(32, 128)))
    ids[:, 0], ids[:, -1] = 101, 102
    feeds = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}

    def runner(m: torch.nn.Module):  # noqa: ANN202
        def run() -> None:
            with torch.inference_mode():
                m(**feeds)
        return run

    for name, config in candidates(adapter).items():
        if args.names and name not in args.names:
            continue
        quantized = adapter.build(adapter.space.canonical(config))
        line = [name, adapter.space.canonical(config).describe()]
        for split, reference in fp32.items():
            score = splits[split].spearman(text.TorchSession(quantized), batches[split])
            line.append(f"{split} loss {100 * (reference - score) / reference:.2f}%")
        if not args.no_latency:
            with timing_lock(args.lock):
                ratio = measure_ratio(runner(model), runner(quantized), budget_s=30, precision=0.03)
            line.append(f"latency {ratio}")
        print("  ".join(line), flush=True)


if __name__ == "__main__":
    main()
