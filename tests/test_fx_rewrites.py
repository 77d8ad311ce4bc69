"""The FX graph rewrites that give EfficientNet-style blocks fast INT8 kernels (adapters/fx_rewrites)."""

import torch
import torch.nn.functional as F
from torch import fx, nn

from autoquant import QuantConfig
from autoquant.adapters.fx import FXAdapter
from autoquant.adapters.fx_rewrites import int8_friendly


class SqueezeExcite(nn.Module):
    """Conv, SiLU (module and functional), and a squeeze-and-excitation gate whose squeeze is a mean."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.act = nn.SiLU()
        self.reduce = nn.Conv2d(8, 4, 1)
        self.expand = nn.Conv2d(4, 8, 1)
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.conv(x))
        gate = torch.sigmoid(self.expand(F.silu(self.reduce(x.mean((2, 3), keepdim=True)))))
        x = x * gate
        return self.head(x.mean(dim=(-2, -1)))  # keepdim False: left as it is


def _targets(gm: fx.GraphModule) -> list:
    modules = dict(gm.named_modules())
    return [type(modules[n.target]) if n.op == "call_module" else n.target
            for n in gm.graph.nodes if n.op in ("call_module", "call_function", "call_method")]


def test_rewrite_keeps_the_output_and_replaces_mean_and_silu():
    torch.manual_seed(0)
    model, x = SqueezeExcite().eval(), torch.randn(2, 3, 16, 16)
    rewritten = int8_friendly(fx.symbolic_trace(model))
    targets = _targets(rewritten)
    assert nn.SiLU not in targets and F.silu not in targets
    assert targets.count(F.adaptive_avg_pool2d) == 1 and targets.count("mean") == 1  # the keepdim=False one stays
    assert targets.count(torch.sigmoid) == 3
    torch.testing.assert_close(rewritten(x), model(x))


def test_full_int8_runs_silu_and_squeeze_quantized():
    """No dequantize/quantize pair around SiLU, no quantized mean: the converted graph has one
    quantize at the input and dequantizes only before the keepdim=False mean of the head."""
    torch.manual_seed(0)
    model = SqueezeExcite().eval()
    batches = [torch.randn(4, 3, 16, 16) for _ in range(2)]
    adapter = FXAdapter(model, batches)
    adapter.calibrate()
    converted = adapter.build(QuantConfig())
    targets = _targets(converted)
    assert targets.count(torch.quantize_per_tensor) == 1, converted.graph
    assert targets.count(F.adaptive_avg_pool2d) == 1
    everything = adapter.build(QuantConfig(fp32_ops=frozenset(adapter.space.op_names)))
    with torch.inference_mode():
        torch.testing.assert_close(everything(batches[0]), model(batches[0]))
