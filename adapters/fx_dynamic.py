"""Dynamic INT8 Linears with the full 8-bit activation range where the kernel does not saturate.

torch's ``DynamicQuantizedLinear`` always asks ``linear_dynamic`` for ``reduce_range=True``: its
activations are quantized to 7 bits, because x86 kernels built on AVX2's ``vpmaddubsw`` add two
u8 x s8 products in int16 and saturate. Kernels on AVX512-VNNI (``vpdpbusd``) accumulate in int32
and do not; there 8 bits halve the activation rounding (all-MiniLM-L6-v2 through FX: test loss
1.31% -> see experiments/results/minilm_sts_fx.md). Whether this build's kernel saturates is
checked once on a worst-case input, not assumed from CPU flags.
"""

from __future__ import annotations

import functools

import torch
from torch import fx, nn
from torch.ao.nn.quantized import dynamic as nnqd


class FullRangeDynamicLinear(nnqd.Linear):
    """A dynamic INT8 Linear that quantizes its input to 8 bits (``reduce_range=False``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.quantized.linear_dynamic(x, self._packed_params._packed_params, reduce_range=False)
        return y.to(x.dtype)


@functools.cache
def full_range_is_exact() -> bool:
    """Whether ``linear_dynamic`` with 8-bit activations stays exact where int16 pair sums would
    saturate: every activation at 255 times every weight at 127 (64 inputs, true output 64)."""
    linear = nn.Linear(64, 4, bias=False)
    with torch.no_grad():
        linear.weight.fill_(1.0)
    linear.qconfig = torch.ao.quantization.per_channel_dynamic_qconfig  # type: ignore[assignment]  # torch reads qconfig off the module
    packed = nnqd.Linear.from_float(linear)._packed_params._packed_params
    x = torch.ones(8, 64)
    x[:, 0] = 0.0  # range [0, 1]: every other activation quantizes to 255
    with torch.inference_mode():
        y = torch.ops.quantized.linear_dynamic(x, packed, reduce_range=False)
    return bool(torch.allclose(y, torch.full_like(y, 63.0), rtol=0.01))


def use_full_range(converted: fx.GraphModule) -> None:
    """Switch the dynamic INT8 Linears of ``converted`` to 8-bit activations (same packed weights)."""
    for module in converted.modules():
        if type(module) is nnqd.Linear and module._packed_params.dtype == torch.qint8:
            module.__class__ = FullRangeDynamicLinear
