"""Dynamic INT8 Linears quantize activations to 8 bits where the kernel does not saturate (7 in torch's own module)."""

from __future__ import annotations

import torch
from torch import nn
from torch.ao.nn.quantized import dynamic as nnqd

from autoquant.adapters.fx import FXAdapter
from autoquant.adapters.fx_dynamic import FullRangeDynamicLinear, full_range_is_exact
from autoquant.space import QuantConfig


def test_dynamic_linears_use_8_bit_activations_where_exact():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 8)).eval()
    data = [torch.randn(32, 64) for _ in range(2)]
    built = FXAdapter(model, data).build(QuantConfig(approach="dynamic"))
    linears = [m for m in built.modules() if isinstance(m, nnqd.Linear)]
    assert len(linears) == 2
    assert all(type(m) is (FullRangeDynamicLinear if full_range_is_exact() else nnqd.Linear) for m in linears)
    if not full_range_is_exact():
        return
    x = torch.randn(256, 64)
    with torch.inference_mode():
        reference = model[0](x)
        eight = linears[0](x)
        linears[0].__class__ = nnqd.Linear  # torch's own forward: reduce_range=True, 7-bit activations
        seven = linears[0](x)
    assert float((eight - reference).norm()) < 0.7 * float((seven - reference).norm())
