"""Fixed FX candidates of all-MiniLM-L6-v2: dev Spearman loss and latency ratio vs FP32 eager.

Each candidate is built from one FXAdapter (256 sts-train calibration sentences); accuracy is
Spearman on all 1,500 sts-dev pairs; latency is ``measure_ratio`` (interleaved pairs, median) at
batch 32 x sequence 128. Time it alone:

    flock /work/timing.lock python experiments/fx_minilm_candidates.py            # every candidate
    python experiments/fx_minilm_candidates.py --no-latency static-adds-fp32      # accuracy only
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from autoquant.adapters.fx import FXAdapter
from autoquant.examples import text
from autoquant.latency import measure_ratio
from autoquant.space import QuantConfig

STS_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "stsbenchmark"


def candidates(adapter: FXAdapter) -> dict[str, QuantConfig]:
    adds = frozenset(op.name for op in adapter.space.ops if op.op_type == "add")
    return {
        "dynamic": QuantConfig(approach="dynamic"),
        "static": QuantConfig(),
        "static-adds-fp32": QuantConfig(fp32_ops=adds),
        "static-smooth0.5-adds-fp32": QuantConfig(fp32_ops=adds, smooth_alpha=0.5),
        "static-entropy": QuantConfig(calibration="entropy"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="candidates to run (default: all)")
    parser.add_argument("--no-latency", action="store_true")
    parser.add_argument("--no-accuracy", action="store_true")
    args = parser.parse_args()
    model = text.load_minilm()
    sentences = text.train_sentences(STS_DIR, 256)
    np.random.default_rng(0).shuffle(sentences)
    adapter = FXAdapter(model, text.torch_batches(text.encode(sentences, 32)))
    dev = text.read_sts(STS_DIR, "dev")
    batches = dev.batches()
    fp32 = None if args.no_accuracy else dev.spearman(text.TorchSession(model), batches)
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
        quantized = adapter.build(config)
        line = [name]
        if fp32 is not None:
            score = dev.spearman(text.TorchSession(quantized), batches)
            line.append(f"dev loss {100 * (fp32 - score) / fp32:.2f}%")
        if not args.no_latency:
            line.append(f"latency {measure_ratio(runner(model), runner(quantized), budget_s=30, precision=0.03)}")
        print("  ".join(line), flush=True)


if __name__ == "__main__":
    main()
