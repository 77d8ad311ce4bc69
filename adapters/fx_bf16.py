"""BF16 as the FX adapter's fallback precision for Linears, where it is measured faster than FP32.

A Linear that falls back sits between FP32 ops, so its BF16 form casts its input to BF16, runs
the BF16 kernel (oneDNN, AVX512-BF16/AMX where the CPU has them) and casts the output back. On
CPUs without native BF16 that is slower than FP32, and even with it the casts can cost more than
the kernel saves on small shapes, so each Linear is timed in that form on its own calibration
input (experiments/fx_bf16.py has the MiniLM numbers) and offered only if its interval is below
FP32's.
"""

from __future__ import annotations

import torch
from torch import nn

from autoquant.latency import LatencyRatio, measure_ratio

BUDGET_S = 0.5  # per distinct Linear shape


class BF16Linear(nn.Module):
    """``linear`` run in BF16 between FP32 ops: BF16 copies of its weights, FP32 in and out."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.inner = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                               dtype=torch.bfloat16)
        with torch.no_grad():
            self.inner.weight.copy_(linear.weight)
            if linear.bias is not None:
                self.inner.bias.copy_(linear.bias)
        self.inner.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.to(torch.bfloat16)).to(x.dtype)


def supported() -> bool:
    """Whether this PyTorch build and CPU run oneDNN BF16 kernels natively."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def bf16_ratio(linear: nn.Linear, x: torch.Tensor, budget_s: float = BUDGET_S) -> LatencyRatio:
    """Latency of ``linear`` as a BF16 fallback over FP32, on input ``x`` (interleaved pairs)."""
    bf16 = BF16Linear(linear)

    def run(module: nn.Module):  # noqa: ANN202
        def call() -> None:
            with torch.inference_mode():
                module(x)
        return call

    return measure_ratio(run(linear), run(bf16), budget_s=budget_s, min_pairs=5)


def measure_bf16(linears: dict[str, tuple[nn.Linear, torch.Tensor]]) -> dict[str, LatencyRatio]:
    """Op name -> BF16-fallback/FP32 latency of each Linear on its input (one measurement per
    shape); empty where the CPU has no native BF16. An op is offered BF16 if ``faster``."""
    if not supported():
        return {}
    by_shape: dict[tuple, LatencyRatio] = {}
    ratios = {}
    for name, (linear, x) in linears.items():
        shape = (linear.in_features, linear.out_features, linear.bias is not None, tuple(x.shape))
        if shape not in by_shape:
            by_shape[shape] = bf16_ratio(linear, x)
        ratios[name] = by_shape[shape]
    return ratios


def faster(ratio: LatencyRatio) -> bool:
    """BF16 is the faster fallback: the whole 95% interval of its ratio is below FP32's."""
    return ratio.high < 1.0
