"""A small random-init Hugging Face BertModel through the FX adapter: every Linear accounted for,
dynamic and static candidates, all-FP32 equal to FP32, save/load, and SmoothQuant (smooth_alpha)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("transformers", reason="the text extra (transformers) is not installed")

from transformers import BertConfig, BertModel  # noqa: E402

from autoquant.adapters.fx import FXAdapter  # noqa: E402
from autoquant.space import QuantConfig  # noqa: E402


def outlier_bert() -> tuple[BertModel, list[dict]]:
    """Two layers, hidden 32; each LayerNorm scales one channel up 30-40x, as trained BERTs do."""
    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32)
    model = BertModel(config).eval()
    with torch.no_grad():
        for layer in model.encoder.layer:
            layer.attention.output.LayerNorm.weight[5] = 30.0
            layer.output.LayerNorm.weight[3] = 40.0
    data = [{"input_ids": torch.randint(0, 50, (4, 8)), "attention_mask": torch.ones(4, 8, dtype=torch.long)}
            for _ in range(3)]
    return model, data


@pytest.fixture(scope="module")
def bert():
    model, data = outlier_bert()
    return model, data, FXAdapter(model, data)


def _out(model: nn.Module, batch: dict) -> torch.Tensor:
    with torch.inference_mode():
        return model(**batch).last_hidden_state


def _mse(model: nn.Module, reference: nn.Module, batch: dict) -> float:
    return float(((_out(model, batch) - _out(reference, batch)) ** 2).mean())


def _adds(adapter: FXAdapter) -> frozenset[str]:
    return frozenset(op.name for op in adapter.space.ops if op.op_type == "add")


def test_every_linear_is_an_op_with_both_approaches(bert):
    model, _, adapter = bert
    linears = {name for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    ops = {op.name: op for op in adapter.space.ops}
    assert len(linears) == 13 and linears <= set(ops)
    assert all(ops[name].approaches == ("static", "dynamic") for name in linears)
    unsupported = {u.name: u.reason for u in adapter.space.unsupported}
    # the attention products (Q x K^T, softmax x V) live in a part FX cannot trace: reported, FP32
    assert "FX cannot trace" in unsupported["encoder.layer.0.attention.self"]
    assert "no INT8 kernel" in unsupported["encoder.layer.0.intermediate.gelu"]


@pytest.mark.parametrize("approach", ["static", "dynamic"])
def test_candidates_run_and_all_fp32_equals_fp32(bert, approach):
    model, data, adapter = bert
    quantized = adapter.build(QuantConfig(approach=approach, fp32_ops=_adds(adapter)))
    assert 0 < _mse(quantized, model, data[1]) < 0.05
    assert any(type(m).__module__.startswith("torch.ao.nn.quantized") for m in quantized.modules())
    fp32 = adapter.build(QuantConfig(approach=approach, fp32_ops=frozenset(op.name for op in adapter.space.ops)))
    torch.testing.assert_close(_out(fp32, data[1]), _out(model, data[1]))


@pytest.mark.parametrize("config", [QuantConfig(approach="dynamic"), QuantConfig(smooth_alpha=0.5)])
def test_saved_candidate_loads_and_matches(bert, tmp_path, config):
    _, data, adapter = bert
    quantized = adapter.build(config)
    loaded = FXAdapter.load_model(adapter.save_model(quantized, tmp_path))
    torch.testing.assert_close(loaded(**data[2]).last_hidden_state, _out(quantized, data[2]))


def test_smoothing_tames_the_outlier_channels(bert):
    model, data, adapter = bert
    assert adapter.space.smooth_alphas[0] is None and 0.5 in adapter.space.smooth_alphas
    adds = _adds(adapter)
    plain = _mse(adapter.build(QuantConfig(fp32_ops=adds)), model, data[0])
    smoothed = _mse(adapter.build(QuantConfig(fp32_ops=adds, smooth_alpha=0.5)), model, data[0])
    assert smoothed < plain / 4  # measured: 19x lower


def test_alpha_changes_the_written_weights_and_scales(bert):
    _, _, adapter = bert
    layer = "encoder.layer.0.intermediate"
    built = {a: adapter.build(QuantConfig(smooth_alpha=a)).get_submodule(layer) for a in (0.5, 0.8)}
    inverse = {a: m._autoquant_smooth_0 for a, m in built.items()}
    assert not torch.allclose(inverse[0.5], inverse[0.8])
    weights = {a: m.dense.weight().dequantize() for a, m in built.items()}
    assert not torch.allclose(weights[0.5], weights[0.8])
    # the original float weights are untouched: an unsmoothed build after smoothed ones equals the first
    model, data, _ = bert
    assert torch.equal(adapter.build(QuantConfig())(**data[0]).last_hidden_state,
                       adapter.build(QuantConfig())(**data[0]).last_hidden_state)


def test_smoothing_skips_fp32_linears(bert):
    model, data, adapter = bert
    every = frozenset(op.name for op in adapter.space.ops)
    fp32 = adapter.build(QuantConfig(smooth_alpha=0.8, fp32_ops=every))
    torch.testing.assert_close(_out(fp32, data[0]), _out(model, data[0]))
