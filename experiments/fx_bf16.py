"""Does PyTorch (CPU, this build) run BF16 faster than FP32 for all-MiniLM-L6-v2's ops?

What a per-op BF16 fallback of the FX adapter would run, at batch 32 x sequence 128 (4,096 rows):

- each Linear shape of MiniLM (384->384: query/key/value/attention output, 384->1536: intermediate,
  1536->384: output) with BF16 weights, its FP32 input cast to BF16 and its output cast back (a
  fallback op sits between FP32 ops), and the same without the casts (the kernel alone);
- one whole ``BertLayer`` of the model and the whole ``BertModel`` in BF16 against FP32 (inputs
  and outputs cast; the upper bound of what a BF16 fallback could give).

Every row is an interleaved ratio against FP32 (``measure_ratio``: median of pairs, 95% CI), in
one process. Time it alone:

    flock /work/timing.lock python experiments/fx_bf16.py
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from autoquant.adapters.fx_bf16 import BF16Linear
from autoquant.examples import text
from autoquant.latency import LatencyRatio, measure_ratio

ROWS, SEQ = 32, 128
SHAPES = {"query/key/value/attention.output 384->384": (384, 384), "intermediate 384->1536": (384, 1536),
          "output 1536->384": (1536, 384)}


def _runner(fn, *args):  # noqa: ANN001, ANN202
    def run() -> None:
        with torch.inference_mode():
            fn(*args)
    return run


def linear_rows(budget_s: float) -> list[tuple[str, str, LatencyRatio]]:
    rows = []
    for name, (k, n) in SHAPES.items():
        fp32 = nn.Linear(k, n).eval()
        fallback = BF16Linear(fp32)  # what the FX adapter builds
        x = torch.randn(ROWS, SEQ, k)
        rows.append((f"Linear {name}", "BF16 kernel alone (input already BF16)",
                     measure_ratio(_runner(fp32, x), _runner(fallback.inner, x.to(torch.bfloat16)),
                                   budget_s=budget_s, precision=0.03)))
        rows.append((f"Linear {name}", "as a fallback op (BF16Linear: cast in, BF16 Linear, cast out)",
                     measure_ratio(_runner(fp32, x), _runner(fallback, x), budget_s=budget_s, precision=0.03)))
    return rows


def model_rows(budget_s: float) -> list[tuple[str, str, LatencyRatio]]:
    model = text.load_minilm()
    ids = torch.randint(1000, 30000, (ROWS, SEQ))
    mask = torch.ones_like(ids)
    layer = model.encoder.layer[0]
    hidden = torch.randn(ROWS, SEQ, model.config.hidden_size)
    layer_bf16 = text.load_minilm().to(torch.bfloat16).encoder.layer[0]
    model_bf16 = text.load_minilm().to(torch.bfloat16)
    return [
        ("BertLayer (MiniLM layer 0)", "whole layer BF16, cast in and out",
         measure_ratio(_runner(layer, hidden), _runner(lambda h: layer_bf16(h.to(torch.bfloat16))[0].float(), hidden),
                       budget_s=budget_s, precision=0.03)),
        ("BertModel (all-MiniLM-L6-v2)", "whole model BF16",
         measure_ratio(_runner(lambda: model(input_ids=ids, attention_mask=mask)),
                       _runner(lambda: model_bf16(input_ids=ids, attention_mask=mask)),
                       budget_s=budget_s, precision=0.03)),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-s", type=float, default=8.0, help="time cap per ratio")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, batch {ROWS} x sequence {SEQ}")
    print("| op | BF16 form | latency / FP32 | 95% CI (pairs) |\n|---|---|---|---|")
    for op, form, r in linear_rows(args.budget_s) + model_rows(args.budget_s):
        print(f"| {op} | {form} | {r.ratio:.2f} | {r.low:.2f}-{r.high:.2f} ({r.pairs}) |", flush=True)


if __name__ == "__main__":
    main()
