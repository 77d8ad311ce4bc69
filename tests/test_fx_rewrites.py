"""The FX graph rewrites that give EfficientNet-style blocks fast INT8 kernels (adapters/fx_rewrites)."""

import operator

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


class LayerScaled(nn.Module):
    """ConvNeXt-style layer scales: ``gamma * linear(x)`` (channels last) and ``conv(x) * gamma``
    with gamma (C, 1, 1); and two that must stay: a Linear read twice, a scalar gamma."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.conv_gamma = nn.Parameter(torch.rand(8, 1, 1) + 0.1)
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)
        self.gamma = nn.Parameter(torch.rand(8) + 0.1)
        self.shared, self.head = nn.Linear(8, 8), nn.Linear(8, 4)
        self.scalar = nn.Parameter(torch.tensor(0.7))  # one value, not one per channel: left a mul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x) * self.conv_gamma
        y = x.permute(0, 2, 3, 1)
        y = y + self.gamma * self.fc2(torch.relu(self.fc1(y)))
        s = self.shared(y.mean((1, 2)))
        return self.head(s * self.gamma + s) * self.scalar


def test_layer_scales_fold_into_their_layer_and_the_model_keeps_its_weights():
    torch.manual_seed(0)
    model, x = LayerScaled().eval(), torch.randn(2, 3, 8, 8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rewritten = int8_friendly(fx.symbolic_trace(model))
    muls = [n for n in rewritten.graph.nodes if n.target in (operator.mul, torch.mul)]
    # folded: conv * conv_gamma, gamma * fc2; kept: shared (read twice), head * scalar
    assert [str(a) for n in muls for a in n.args if "gamma" in str(a) or "scalar" in str(a)] == ["gamma", "scalar"]
    torch.testing.assert_close(rewritten(x), model(x))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    adapter = FXAdapter(model, [x])
    assert sum(op.op_type == "mul" for op in adapter.space.ops) == 2  # the folded muls are no ops to search
