"""BF16 as the FX fallback precision: offered only for the Linears measured faster in it, built
where chosen, and close to FP32; the space's knob, its canonical form and the strategy's latency."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn

from autoquant.adapters.fx import FXAdapter
from autoquant.adapters.fx_bf16 import BF16Linear, faster, supported
from autoquant.errors import ConfigError
from autoquant.space import OpInfo, QuantConfig, Space


class Wide(nn.Module):
    """A Linear big enough for BF16 to pay off on CPUs with native BF16 (1024 -> 4096 on 1,024
    rows: about 0.6 of FP32 here), then a 2-wide head whose input casts cost more than it computes
    (about 1.8x FP32 here)."""

    def __init__(self) -> None:
        super().__init__()
        self.big = nn.Linear(1024, 4096)
        self.act = nn.GELU()
        self.head = nn.Linear(4096, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.big(x)))


@pytest.fixture(scope="module")
def wide():
    torch.manual_seed(0)
    model = Wide().eval()
    data = [torch.randn(1024, 1024)]
    return model, data, FXAdapter(model, data)


def test_bf16_is_offered_exactly_where_measured_faster(wide):
    _, _, adapter = wide
    if not supported():
        assert adapter.bf16_measured == {} and adapter.space.fallbacks == ("fp32",)
        return
    assert set(adapter.bf16_measured) == {"big", "head"}  # every Linear is measured
    offered = {op.name for op in adapter.space.ops if op.bf16_ratio is not None}
    assert offered == {name for name, r in adapter.bf16_measured.items() if faster(r)}
    assert "head" not in offered and adapter.bf16_measured["head"].ratio > 1  # casts cost more than it saves
    assert adapter.space.fallbacks == (("fp32", "bf16") if offered else ("fp32",))


def test_bf16_fallback_builds_runs_and_stays_close_to_fp32(wide):
    model, data, adapter = wide
    offered = adapter.space.bf16_ops()
    every = frozenset(adapter.space.op_names)
    if not offered:  # no BF16 kernels on this CPU, or no Linear faster in BF16: the knob is not in the space
        with pytest.raises(ConfigError, match="fallback: bf16 is not offered here.*Set fallback: fp32"):
            adapter.build(QuantConfig(fp32_ops=every, fallback="bf16"))
        return
    built = adapter.build(QuantConfig(fp32_ops=every, fallback="bf16"))
    bf16 = {name for name, m in built.named_modules() if isinstance(m, BF16Linear)}
    assert bf16 == offered  # BF16 only where it was measured faster; the rest FP32
    assert not any(isinstance(m, BF16Linear) for m in adapter.build(QuantConfig(fp32_ops=every)).modules())
    with torch.inference_mode():
        reference, out = model(data[0]), built(data[0])
    assert out.dtype == torch.float32
    error = float((out - reference).norm() / reference.norm())
    assert (error > 0) == bool(offered) and error < 1e-2  # BF16 rounding, far below INT8's


def test_a_config_naming_its_bf16_ops_rebuilds_them_whatever_the_timing_offers(wide):
    # a result's config names the Linears it built in BF16, so it rebuilds the same model where a
    # later adapter's timing offers other ones: "head" is measured slower in BF16, built in it when named
    _, _, adapter = wide
    named = QuantConfig(fp32_ops=frozenset({"big", "head"}), bf16_ops=frozenset({"head"}))
    if not supported():
        with pytest.raises(ConfigError, match=r"bf16_ops \['head'\] cannot be built in BF16 here.*Remove bf16_ops"):
            adapter.build(named)
        return
    assert "head" not in adapter.space.bf16_ops() and adapter.space.bf16_buildable == {"big", "head"}
    built = adapter.build(named)
    assert {name for name, m in built.named_modules() if isinstance(m, BF16Linear)} == {"head"}
    resolved = adapter.space.resolve(QuantConfig(fp32_ops=frozenset({"big", "head"}), fallback="bf16"))
    assert resolved.bf16_ops == adapter.space.bf16_ops()  # what the timing offered, named


def test_resolve_names_the_bf16_ops_and_a_saved_config_keeps_them():
    space = replace(_space(), bf16_buildable=frozenset({"big", "small"}))
    resolved = space.resolve(QuantConfig(fp32_ops=frozenset({"big", "small"}), fallback="bf16"))
    assert resolved.bf16_ops == {"big"} and resolved.to_dict()["bf16_ops"] == ["big"]
    assert QuantConfig.from_dict(resolved.to_dict()) == resolved
    assert "bf16_ops" not in space.resolve(QuantConfig(fp32_ops=frozenset({"big"}))).to_dict()
    # named ops need no timed offer, and apply only to ops in FP32
    named = space.validate(QuantConfig(fp32_ops=frozenset({"small"}), bf16_ops=frozenset({"small", "big"})))
    assert named.bf16_ops == {"small"} and named.fallback == "bf16"
    assert space.validate(QuantConfig(bf16_ops=frozenset({"big"}))) == QuantConfig()
    with pytest.raises(ConfigError, match=r"bf16_ops \['big'\] cannot be built in BF16 here"):
        _space().validate(QuantConfig(fp32_ops=frozenset({"big"}), bf16_ops=frozenset({"big"})))
    with pytest.raises(ConfigError, match="Unknown op 'nope'"):
        space.validate(QuantConfig(fp32_ops=frozenset({"big"}), bf16_ops=frozenset({"nope"})))


def test_bf16_linear_computes_in_bf16():
    torch.manual_seed(0)
    linear = nn.Linear(64, 32)
    x = torch.randn(8, 64)
    wrapped = BF16Linear(linear)
    assert wrapped.inner.weight.dtype == torch.bfloat16
    with torch.inference_mode():
        out, reference = wrapped(x), linear(x)
    assert out.dtype == torch.float32
    assert 0 < float((out - reference).abs().max()) < 0.05


def _space() -> Space:
    ops = (OpInfo("big", "Linear", bf16_ratio=0.6), OpInfo("small", "Linear"))
    return Space(ops, fallbacks=("fp32", "bf16"))


def test_a_bf16_config_where_bf16_is_not_offered_says_why_and_the_fix():
    # e.g. a saved config re-run where no Linear measures faster in BF16 (the offer is timed)
    space = Space((OpInfo("big", "Linear"),))
    with pytest.raises(ConfigError, match="no Linear of this model was measured faster.*Set fallback: fp32"):
        space.validate(QuantConfig(fp32_ops=frozenset({"big"}), fallback="bf16"))


def test_fallback_knob_applies_only_to_bf16_ops_in_fp32():
    space = _space()
    assert space.bf16_ops() == {"big"}
    on = space.canonical(QuantConfig(fp32_ops=frozenset({"big"}), fallback="bf16"))
    assert on.fallback == "bf16" and on.describe().endswith("bf16-fallback") and on.to_dict()["fallback"] == "bf16"
    # nothing it would change: the same candidate as the FP32 fallback
    assert space.canonical(QuantConfig(fp32_ops=frozenset({"small"}), fallback="bf16")).fallback == "fp32"
    assert space.canonical(QuantConfig(fallback="bf16")) == QuantConfig()
    assert "fallback" not in QuantConfig().to_dict()  # configs stored before the knob keep their keys
    assert QuantConfig.from_dict(on.to_dict()) == on


def test_sensitivity_predicts_a_bf16_fallback_faster_than_fp32():
    from autoquant.strategies.sensitivity import OpSensitivity, SensitivityStrategy, _Profile, _Search

    search = _Search(SensitivityStrategy(), _space(), None, 0.01)  # type: ignore[arg-type]  # no probe needed
    search.profiles["static"] = _Profile(QuantConfig(), (OpSensitivity("big", "Linear", 0.9, latency_cost=0.2),))
    fp32 = search._latency(QuantConfig(fp32_ops=frozenset({"big"})))
    bf16 = search._latency(QuantConfig(fp32_ops=frozenset({"big"}), fallback="bf16"))
    assert fp32 == pytest.approx(0.2) and bf16 == pytest.approx(0.12)
