"""The FX adapter on PyTorch's real x86 INT8 kernels (no mocks)."""

import copy

import pytest
import torch
from torch import nn
from torch.ao.nn import quantized as nnq
from torch.ao.nn.quantized import dynamic as nnqd
from torch.ao.quantization import MinMaxObserver, PerChannelMinMaxObserver, QConfig, QConfigMapping
from torch.ao.quantization.backend_config.x86 import get_x86_backend_config
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

import autoquant
from autoquant import BackendError, CalibrationDataError, QuantConfig
from autoquant.adapters.fx import FXAdapter
from autoquant.calibration import compute_range

torch.manual_seed(0)


class ResNetLet(nn.Module):
    """conv-bn-relu, a residual add, a classifier: every kind of op the adapter searches."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.body = nn.Conv2d(16, 16, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(self.body(x) + x)
        return self.head(torch.flatten(self.pool(x), 1))


def batches(n=4, size=16, outlier=None):
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(size, 3, 12, 12, generator=gen), torch.zeros(size)) for _ in range(n)]
    if outlier is not None:
        data[0][0][0, 0, 0, 0] = outlier
    return data


@pytest.fixture(scope="module")
def adapter():
    model = ResNetLet().eval()
    with torch.no_grad():  # non-trivial BN statistics, so folding matters
        model.stem[1].running_mean.uniform_(-0.5, 0.5)
        model.stem[1].running_var.uniform_(0.5, 2.0)
    return FXAdapter(model, batches(outlier=40.0))


def quantized_modules(model):
    return {name: type(m) for name, m in model.named_modules() if type(m).__module__.startswith("torch.ao.nn")}


def quantized_calls(model):
    return [n.target for n in model.graph.nodes if n.op == "call_function" and "quantized" in str(n.target)]


def test_space_comes_from_the_converted_graph(adapter):
    ops = {op.name: op for op in adapter.space.ops}
    assert list(ops) == ["stem.0", "body", "add", "head"]
    assert ops["stem.0"].op_type == "ConvReLU2d"  # conv+bn+relu fused, BN folded
    assert ops["add"].op_type == "add"
    assert ops["head"].approaches == ("static", "dynamic") and ops["body"].approaches == ("static",)
    assert adapter.space.approaches == ("static", "dynamic")


def test_all_int8_uses_real_quantized_kernels(adapter):
    model = adapter.build(QuantConfig())
    kinds = quantized_modules(model)
    assert kinds["stem.0"].__name__ == "ConvReLU2d" and kinds["body"] is nnq.Conv2d and kinds["head"] is nnq.Linear
    assert any("add_relu" in str(t) for t in quantized_calls(model))


def input_qparams(model):
    scale = model.get_buffer("stem_0_input_scale_0").item()
    zero_point = model.get_buffer("stem_0_input_zero_point_0").item()
    return scale, zero_point


def test_scheme_and_calibration_set_the_activation_qparams(adapter):
    stats = adapter._stats["/x"]
    lo, hi = compute_range(stats, "minmax")
    scale, zp = input_qparams(adapter.build(QuantConfig(calibration="minmax", scheme="asymmetric")))
    assert scale == pytest.approx((hi - lo) / 255, rel=1e-5) and zp == round(-lo / scale)
    scale, zp = input_qparams(adapter.build(QuantConfig(calibration="minmax", scheme="symmetric")))
    assert zp == 128 and scale == pytest.approx(2 * max(-lo, hi) / 255, rel=1e-5)
    # the input holds one outlier of 40 among N(0, 1) values: KL and percentile clip it, minmax keeps it
    for clipping in ("entropy", "percentile-99.99"):
        clipped, _ = input_qparams(adapter.build(QuantConfig(calibration=clipping)))
        assert clipped < scale / 3


def test_injected_ranges_equal_normal_calibration():
    model, data = ResNetLet().eval(), batches()
    config = QuantConfig(calibration="minmax", scheme="asymmetric", granularity="per_channel")
    ours = FXAdapter(model, data).build(config)
    qconfig = QConfig(MinMaxObserver.with_args(dtype=torch.quint8),
                      PerChannelMinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_channel_symmetric))
    prepared = prepare_fx(copy.deepcopy(model), QConfigMapping().set_global(qconfig), (data[0][0],),
                          backend_config=get_x86_backend_config())
    with torch.no_grad():
        for x, _ in data:
            prepared(x)
    reference = convert_fx(prepared)
    x = data[0][0]
    assert torch.equal(ours(x), reference(x))


def test_ops_that_only_follow_fp32_ops_stay_fp32(adapter):
    # relu/pool/flatten after an FP32 add must not become a quantize/dequantize island
    model = adapter.build(QuantConfig(fp32_ops=frozenset({"stem.0", "body", "add"})))
    code = model.code
    assert code.count("torch.quantize_per_tensor(") == 1  # only the head's input
    assert code.index("torch.quantize_per_tensor(") > code.index("torch.flatten(")
    everything = adapter.build(QuantConfig(fp32_ops=frozenset(adapter.space.op_names)))
    assert not quantized_modules(everything) and type(everything) is type(adapter.fp32_model)  # no convert
    x = batches()[0][0]
    assert torch.equal(everything(x), adapter.fp32_model(x))


def test_dynamic_quantizes_linear_only(adapter):
    model = adapter.build(QuantConfig("dynamic", None, "per_channel", None))
    assert isinstance(model.get_submodule("head"), nnqd.Linear)  # FullRangeDynamicLinear where exact
    assert type(model.get_submodule("body")) is nn.Conv2d


def test_dynamic_fallback_leaves_the_ops_and_their_inputs_fp32():
    from tests.test_sensitivity import OutlierNet  # Linears joined by torch.relu and a .mul() method call

    model = OutlierNet().eval()
    data = [torch.randn(32, 16, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    adapter = FXAdapter(model, data)
    every = frozenset(op.name for op in adapter.space.ops)
    adapter.build(adapter.space.default_config())  # a static candidate first: the units are shared
    candidate = adapter.build(QuantConfig("dynamic", None, "per_channel", None, fp32_ops=every - {"fc3"}))
    assert {name.split(".")[0] for name in quantized_modules(candidate)} == {"fc3"}  # only fc3 is INT8
    assert torch.quantize_per_tensor_dynamic not in [n.target for n in candidate.graph.nodes]
    candidate = adapter.build(QuantConfig("dynamic", None, "per_channel", None, fp32_ops=every))
    with torch.no_grad():
        torch.testing.assert_close(candidate(data[0]), model(data[0]), rtol=1e-5, atol=1e-5)


def test_candidates_are_independent_and_close_to_fp32(adapter):
    x = batches()[1][0]
    fp32 = adapter.fp32_model(x)
    a, b = adapter.build(QuantConfig()), adapter.build(QuantConfig(fp32_ops=frozenset({"head"})))
    assert not torch.equal(a(x), b(x))
    assert torch.allclose(a(x), fp32, atol=0.3)


class Gate(nn.Module):
    """Data-dependent control flow: FX cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
        self.b = nn.Linear(8, 4)

    def forward(self, x):
        y = self.a(x)
        if y.mean() > 0:
            y = y * 2
        return self.b(y.mean((2, 3)))


class Outer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate = Gate()
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        h = self.gate(x)
        for _ in range(int(h.abs().sum() > 0)):  # untraceable here too
            h = h + 1
        return self.out(h)


def test_untraceable_model_quantizes_the_parts_that_trace():
    model = Outer().eval()
    adapter = FXAdapter(model, batches())
    unsupported = {u.name: u.reason for u in adapter.space.unsupported}
    assert "(whole model)" in unsupported and "gate" in unsupported
    assert "FX cannot trace" in unsupported["gate"]
    assert [op.name for op in adapter.space.ops] == ["gate.a.0", "gate.b", "out"]
    quantized = adapter.build(QuantConfig())
    assert type(quantized.gate.b).__name__ == "GraphModule" and type(quantized.gate).__name__ == "Gate"
    assert type(quantized.out).__name__ == "GraphModule" and type(quantized.out.module) is nnq.Linear
    x = batches()[0][0]
    assert torch.allclose(quantized(x), model(x), atol=0.1)
    fallback = adapter.build(QuantConfig(fp32_ops=frozenset({"out"})))
    assert type(fallback.out) is nn.Linear  # a unit with every op FP32 is the model's own part, unconverted
    assert quantized_modules(fallback.gate.a)  # the others are still converted
    assert quantized_modules(quantized.gate.a)  # the conv really is INT8


def test_nothing_quantizable_is_a_clear_error():
    with pytest.raises(BackendError, match="Nothing in this model can be quantized"):
        FXAdapter(nn.Sequential(nn.GELU()).eval(), [torch.randn(2, 3)])


def test_dict_batches_are_keyword_inputs():
    class Keyword(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(6, 3)

        def forward(self, features, mask):
            return self.fc(features) * mask

    data = [{"mask": torch.ones(4, 1), "features": torch.randn(4, 6)} for _ in range(3)]
    adapter = FXAdapter(Keyword().eval(), data)
    model = adapter.build(QuantConfig())
    assert type(model.get_submodule("fc")) is nnq.Linear
    assert autoquant.Tuner(max_trials=1).space(Keyword().eval(), data).op_names == ("fc", "mul")


def test_per_op_calibration_changes_only_that_ops_input(adapter):
    base = adapter.build(QuantConfig(calibration="minmax"))
    override = adapter.build(QuantConfig(calibration="minmax", op_calibration={"stem.0": "entropy"}))
    assert input_qparams(override)[0] < input_qparams(base)[0] / 3  # the outlier input is clipped
    # tensors read by other ops keep their min-max range
    scales = {name: b.item() for name, b in base.named_buffers() if name.endswith("_scale_0")}
    changed = {name for name, b in override.named_buffers() if name in scales and b.item() != scales[name]}
    assert len(scales) == 2 and changed == {"stem_0_input_scale_0"}
    for name in ("stem.0", "body", "head"):  # output scales of the quantized modules
        assert override.get_submodule(name).scale == base.get_submodule(name).scale


def test_output_probe_measures_distance_from_fp32(adapter):
    from autoquant.probe import OutputProbe

    probe = OutputProbe(adapter, adapter.space)
    everything_fp32 = QuantConfig(fp32_ops=frozenset(adapter.space.op_names))
    assert probe.error(everything_fp32) < 1e-12  # only BN folding's rounding
    assert probe.error(QuantConfig()) > 1e-6
    assert probe.calls == 2


# --- any architecture (issues 14 and 11) ------------------------------------------------------------
class SameConv(nn.Conv2d):
    """A conv subclass with its own forward: "same" padding from the input's shape, then F.conv2d."""

    def forward(self, x):
        sizes = zip(x.shape[-2:], self.kernel_size, self.stride, strict=True)
        total = [max((-(s // -st) - 1) * st + k - s, 0) for s, k, st in sizes]
        x = nn.functional.pad(x, [total[1] // 2, total[1] - total[1] // 2, total[0] // 2, total[0] - total[0] // 2])
        return nn.functional.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class Block(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = SameConv(channels, channels, 3, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()
        self.dropout = nn.Dropout(0.1)

    def forward(self, x):
        return x + self.dropout(self.relu(self.bn(self.conv(x))))


class SubclassNet(nn.Module):
    """Conv subclasses + BN, residual adds, a squeeze-excite gate and a functional linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(SameConv(3, 8, 3, stride=2, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.blocks = nn.ModuleList([Block(8), Block(8)])
        self.gate = nn.Conv2d(8, 8, 1)
        self.head_weight = nn.Parameter(torch.randn(4, 8) * 0.3)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        x = x * torch.sigmoid(self.gate(x.mean((2, 3), keepdim=True)))
        return nn.functional.linear(x.mean((2, 3)), self.head_weight)


def with_bn_statistics(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.fixture(scope="module")
def subclass_adapter():
    return FXAdapter(with_bn_statistics(SubclassNet()), batches())


def test_conv_subclasses_and_functional_linears_are_ops_with_bn_folded(subclass_adapter):
    ops = {op.name: op.op_type for op in subclass_adapter.space.ops}
    assert ops["stem.0"] == "ConvReLU2d"  # pad folded or kept, conv+BN+ReLU one fused kernel
    assert ops["blocks.0.conv"] == ops["blocks.1.conv"] == "ConvReLU2d"
    assert ops["head_weight.linear" if "head_weight.linear" in ops else "linear"] == "Linear"
    assert "mul" in ops and "add" in ops and "gate" in ops
    assert not any(t in ("BatchNorm2d", "Dropout") for t in ops.values())  # folded / not offered
    model = subclass_adapter.build(QuantConfig())
    assert not any(isinstance(m, (nn.BatchNorm2d, nnq.BatchNorm2d)) for m in model.modules())


def test_falling_back_the_op_before_a_residual_add_keeps_that_path_fp32(subclass_adapter):
    model, x = subclass_adapter.fp32_model, batches()[1][0]
    fallback = subclass_adapter.build(QuantConfig(fp32_ops=frozenset({"blocks.1.conv"})))
    conv = fallback.get_submodule("blocks.1.conv")
    assert not type(conv).__module__.startswith("torch.ao.nn.intrinsic.quantized")  # float fused conv+bn+relu
    # that conv's output equals the FP32 block's on the same (dequantized) input
    seen = {}
    conv.register_forward_hook(lambda m, args, out: seen.update(input=args[0], output=out))
    fallback(x)
    reference = model.blocks[1].relu(model.blocks[1].bn(nn.functional.conv2d(
        seen["input"], model.blocks[1].conv.weight, None, 1, 1)))
    assert seen["output"].dtype == torch.float32
    torch.testing.assert_close(seen["output"], reference, atol=1e-5, rtol=1e-5)
    everything = subclass_adapter.build(QuantConfig(fp32_ops=frozenset(subclass_adapter.space.op_names)))
    torch.testing.assert_close(everything(x), model(x), atol=1e-5, rtol=1e-5)


def test_candidates_reuse_the_prepared_graph(subclass_adapter, monkeypatch):
    subclass_adapter.build(QuantConfig())
    monkeypatch.setattr("autoquant.adapters.fx.prepare_fx", lambda *a, **k: pytest.fail("prepared again"))
    first = subclass_adapter.build(QuantConfig(fp32_ops=frozenset({"gate"})))
    second = subclass_adapter.build(QuantConfig(fp32_ops=frozenset({"gate"})))
    x = batches()[0][0]
    assert torch.equal(first(x), second(x))


def test_scored_candidates_share_packed_weights_and_timed_ones_pack_their_own(adapter):
    """A oneDNN packed conv keeps one primitive, for the first input shape and threads it ran with,
    and runs slower on others: a model that is timed or returned must not share its packed weights
    with candidates run elsewhere; the probe's scored models may (they save the packing)."""
    def packed(model):
        return model.get_submodule("body")._packed_params

    scored = adapter.build_for_outputs(QuantConfig())
    other = adapter.build_for_outputs(QuantConfig(calibration="entropy"))
    timed, again = adapter.build(QuantConfig()), adapter.build(QuantConfig())
    assert packed(scored) is packed(other)
    assert packed(timed) is not packed(scored) and packed(timed) is not packed(again)
    x = batches()[0][0]
    assert torch.equal(timed(x), scored(x))


def test_no_fixed_qparams_warning(recwarn):
    FXAdapter(with_bn_statistics(SubclassNet()), batches()).build(QuantConfig())
    assert not [w for w in recwarn if "FixedQParams" in str(w.message)]


class SamePadBlock(nn.Module):
    """conv+BN+ReLU6 behind TF "same" padding computed from the input's shape in ``forward``, as
    Hugging Face's MobileNetV2 does: FX cannot trace ``int(x.shape[-1])``."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv, self.bn, self.act = nn.Conv2d(cin, cout, 3, stride, bias=False), nn.BatchNorm2d(cout), nn.ReLU6()

    def forward(self, x):
        stride, pads = self.conv.stride[0], []
        for size in (int(x.shape[-1]), int(x.shape[-2])):
            total = max(3 - (size % stride or stride), 0)
            pads += [total // 2, total - total // 2]
        return self.act(self.bn(self.conv(nn.functional.pad(x, pads))))


class SamePadNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.down, self.same, self.head = SamePadBlock(3, 8, 2), SamePadBlock(8, 8, 1), nn.Linear(8, 4)

    def forward(self, x):
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(self.same(self.down(x)), 1), 1))


def image_batches(shapes):
    gen = torch.Generator().manual_seed(2)
    return [torch.randn(*shape, generator=gen) for shape in shapes]


def test_shape_dependent_padding_traces_at_the_calibration_shape():
    model = with_bn_statistics(SamePadNet())
    data = image_batches([(8, 3, 12, 12)] * 3 + [(5, 3, 12, 12)])  # a last, smaller batch: the graph allows it
    adapter = FXAdapter(model, data)
    assert not adapter.space.unsupported  # one graph: the whole model, not one unit per conv
    assert {op.name: op.op_type for op in adapter.space.ops} == {"down.conv": "Conv2d", "same.conv": "Conv2d",
                                                                 "head": "Linear"}
    quantized = adapter.build(QuantConfig())
    assert type(quantized.down.conv) is nnq.Conv2d and type(quantized.same.conv) is nnq.Conv2d
    assert not any(isinstance(m, (nn.BatchNorm2d, nnq.BatchNorm2d)) for m in quantized.modules())  # BN folded
    assert "dequantize" not in quantized.code.split("head")[0]  # ReLU6 runs on the INT8 tensors: no FP32 between
    for x in (data[0], data[-1], data[0][:1]):
        torch.testing.assert_close(quantized(x), model(x), atol=0.1, rtol=0.1)
    with pytest.raises(ValueError, match=r"traced for inputs of shape \[\*, 3, 12, 12\].*shape \[8, 3, 16, 16\]"):
        quantized(torch.randn(8, 3, 16, 16))  # another padding: a clear error, not a wrong result


class TFDepthwiseNet(nn.Module):
    """Depthwise convs behind TensorFlow "same" padding at stride 2 (pads (0, 1) for 3x3 and (1, 2)
    for 5x5 on even sizes), each followed by BN and ReLU6, as EfficientNet and MobileNetV2 are."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 1)
        self.dw3 = nn.Sequential(nn.Conv2d(16, 16, 3, 2, groups=16, bias=False), nn.BatchNorm2d(16), nn.ReLU6())
        self.dw5 = nn.Sequential(nn.Conv2d(16, 16, 5, 2, groups=16, bias=False), nn.BatchNorm2d(16), nn.ReLU6())
        self.pad5 = nn.ZeroPad2d((1, 2, 1, 2))  # Hugging Face's EfficientNet pads with a module
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        x = self.dw3(nn.functional.pad(self.stem(x), (0, 1, 0, 1)))
        x = self.dw5(self.pad5(x))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def test_tf_padded_depthwise_convs_take_the_same_padding_int8_kernel():
    model = with_bn_statistics(TFDepthwiseNet())
    data = image_batches([(4, 3, 16, 16)] * 2)
    adapter = FXAdapter(model, data)
    quantized = adapter.build(QuantConfig())
    # padded by k//2 themselves (x86's fast INT8 depthwise path), not unpadded on a padded input
    assert quantized.get_submodule("dw3.0").padding == (1, 1) and quantized.get_submodule("dw5.0").padding == (2, 2)
    assert "pad" in quantized.code  # the re-aligned input padding and the crop, on the INT8 tensors
    everything = adapter.build(QuantConfig(fp32_ops=frozenset(adapter.space.op_names)))
    for x in data:
        torch.testing.assert_close(everything(x), model(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(quantized(x), model(x), atol=0.05, rtol=0.05)


class ChannelCheckNet(nn.Module):
    """Checks its input's channel count, as Hugging Face's ResNet does: FX cannot trace the ``if``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())

    def forward(self, x):
        if x.shape[1] != 3:
            raise ValueError("expected 3 channels")
        return self.conv(x)


def test_a_graph_that_only_checks_the_channels_leaves_batch_and_image_size_free():
    model = with_bn_statistics(ChannelCheckNet())
    adapter = FXAdapter(model, image_batches([(4, 3, 12, 12)] * 2))
    assert not adapter.space.unsupported and [op.name for op in adapter.space.ops] == ["conv.0"]
    quantized = adapter.build(QuantConfig())
    x = torch.randn(2, 3, 20, 20)
    torch.testing.assert_close(quantized(x), model(x), atol=0.1, rtol=0.1)
    with pytest.raises(ValueError, match=r"traced for inputs of shape \[\*, 3, \*, \*\]"):
        quantized(torch.randn(2, 4, 12, 12))


def test_shape_dependent_padding_with_varying_calibration_shapes_splits_as_before():
    model = with_bn_statistics(SamePadNet())
    data = image_batches([(4, 3, 13, 13), (4, 3, 16, 16)])  # the padding differs between these
    adapter = FXAdapter(model, data)
    unsupported = {u.name: u.reason for u in adapter.space.unsupported}
    assert "FX cannot trace" in unsupported["(whole model)"]
    assert [op.name for op in adapter.space.ops] == ["down.conv", "same.conv", "head"]
    quantized = adapter.build(QuantConfig())
    for x in data:
        torch.testing.assert_close(quantized(x), model(x), atol=0.1, rtol=0.1)


def small_bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32)
    data = [{"input_ids": torch.randint(0, 50, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long)}
            for _ in range(2)]
    return BertModel(config).eval(), data


@pytest.fixture(scope="module")
def bert():
    model, data = small_bert()
    return model, data, FXAdapter(model, data)


def test_every_linear_of_a_bert_is_searched_or_accounted_for(bert):
    model, data, adapter = bert
    linears = {name for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    ops = {op.name for op in adapter.space.ops}
    assert len(linears) == 13 and linears <= ops  # the ModuleList's layers are visited
    fp32 = adapter.build(QuantConfig(fp32_ops=frozenset(ops)))
    torch.testing.assert_close(fp32(**data[0]).last_hidden_state, model(**data[0]).last_hidden_state)


def test_transformer_encoder_is_not_one_opaque_leaf():
    class Classifier(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 2)
            self.fc = nn.Linear(16, 3)

        def forward(self, x):
            return self.fc(self.encoder(x).mean(1))

    model, data = Classifier().eval(), [torch.randn(2, 6, 16) for _ in range(2)]
    adapter = FXAdapter(model, data)
    ops = {op.name for op in adapter.space.ops}
    assert {"encoder.layers.0.linear1", "encoder.layers.1.linear2", "fc"} <= ops
    unsupported = {u.name: u.reason for u in adapter.space.unsupported}
    assert "never called as a module" in unsupported["encoder.layers.0.self_attn.out_proj"]
    linears = {name for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert linears <= ops | set(unsupported)
    quantized = adapter.build(QuantConfig())  # INT8 linears really run: torch's fused fast path is off
    assert not torch.equal(quantized(data[0]), model(data[0]))
    torch.testing.assert_close(adapter.build(QuantConfig(fp32_ops=frozenset(ops)))(data[0]), model(data[0]))


def test_dict_output_model_saves_and_reloads(bert, tmp_path):
    _, data, adapter = bert
    quantized = adapter.build(QuantConfig())
    loaded = FXAdapter.load_model(adapter.save_model(quantized, tmp_path))
    out = loaded(**data[1])
    assert type(out) is type(quantized(**data[1]))
    torch.testing.assert_close(out.last_hidden_state, quantized(**data[1]).last_hidden_state)


def test_a_tuned_dict_output_model_saves_reloads_and_scores_as_reported(bert, tmp_path):
    model, data, _ = bert
    reference = model(**data[1]).last_hidden_state.detach()

    def eval_fn(candidate):  # closeness to FP32 on a batch: the output is a dict-like ModelOutput
        return -float(((candidate(**data[1]).last_hidden_state - reference) ** 2).mean().detach())

    result = autoquant.Tuner(max_trials=1, latency_budget_s=0.01, criterion=autoquant.AccuracyCriterion(
        absolute=1.0)).tune(model, data, eval_fn, verbose=False)
    result.save(tmp_path)
    assert eval_fn(autoquant.load(tmp_path)) == pytest.approx(result.accuracy, rel=1e-6, abs=1e-12)
    assert result.accuracy < 0  # a quantized model, not the FP32 one


def test_wrong_input_signature_is_reported_before_tracing():
    with pytest.raises(CalibrationDataError, match="FP32 model fails on the first calibration batch"):
        FXAdapter(ResNetLet().eval(), [(torch.randn(2, 5, 12, 12), torch.randn(2, 5, 12, 12), 0)])


def test_smoothing_is_offered_only_where_the_linear_input_is_float():
    # A Linear fed by an INT8 Linear+ReLU receives an already quantized tensor: there is no
    # quantize to divide by s before, so no smoothing (it once failed every smoothed candidate).
    torch.manual_seed(0)
    int8_fed = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    batches = [torch.randn(16, 8) for _ in range(2)]
    assert FXAdapter(int8_fed, batches).space.smooth_alphas == (None,)

    float_fed = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 4)).eval()
    adapter = FXAdapter(float_fed, batches)
    adapter.calibrate()
    alphas = [a for a in adapter.space.smooth_alphas if a is not None]
    assert alphas
    x = batches[0]
    for alpha in alphas:
        out = adapter.build(QuantConfig(smooth_alpha=alpha))(x)
        assert torch.allclose(out, float_fed(x), atol=0.1)


class PreNormBlock(nn.Module):
    """A pre-LN block: the LayerNorm reads an INT8 tensor, so torch.ao makes it an INT8 LayerNorm,
    which hands its Linear an already quantized tensor; one LayerNorm channel is 30x the rest."""

    def __init__(self):
        super().__init__()
        self.embed, self.norm = nn.Linear(8, 16), nn.LayerNorm(16)
        self.fc, self.head = nn.Linear(16, 16), nn.Linear(16, 4)
        with torch.no_grad():
            self.norm.weight[3] = 30.0

    def forward(self, x):
        h = self.embed(x)
        return self.head(h + self.fc(self.norm(h)))


def test_smoothing_folds_into_an_int8_layer_norm():
    # It once failed every smoothed candidate of a pre-LN transformer ("expected a quantize_per_tensor").
    torch.manual_seed(0)
    model, batches = PreNormBlock().eval(), [torch.randn(32, 8) for _ in range(4)]
    adapter = FXAdapter(model, batches)
    adapter.calibrate()
    x, errors = batches[0], {}
    for alpha in adapter.space.smooth_alphas:
        built = adapter.build(QuantConfig(smooth_alpha=alpha))
        assert isinstance(built.get_submodule("norm"), torch.ao.nn.quantized.LayerNorm)
        errors[alpha] = float(((built(x) - model(x)) ** 2).mean() / (model(x) ** 2).mean())
    assert all(errors[a] < errors[None] for a in errors if a is not None), errors
    assert model.norm.weight[3] == 30.0  # the float model's parameters are untouched


class ShapeScaledAttention(nn.Module):
    """Attention scores scaled by a number computed from the input's shape, ``(d // heads) ** -0.5``:
    FX traces it as nodes, and torch.ao observes it as if it were a tensor."""

    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.heads, self.qkv, self.out = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, 4)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        scores = torch.matmul(q, k.transpose(-2, -1)) * (d // self.heads) ** -0.5
        return self.out(torch.matmul(torch.softmax(scores, dim=-1), v)).mean(1)


def test_a_scale_computed_from_a_shape_is_no_tensor_to_quantize():
    torch.manual_seed(0)
    model = ShapeScaledAttention().eval()
    data = [torch.randn(4, 6, 16) for _ in range(3)]
    adapter = FXAdapter(model, data)
    assert "mul" not in adapter.space.op_names  # one input is a number: nothing to quantize there
    assert {"qkv", "out", "matmul", "matmul_1"} <= set(adapter.space.op_names)
    adapter.calibrate()
    x = data[0]
    quantized = adapter.build(QuantConfig())  # raised: no values observed for the scale's "tensor"
    assert quantized_modules(quantized) and torch.allclose(quantized(x), model(x), atol=0.05)
    for op in adapter.space.op_names:
        adapter.build(QuantConfig(fp32_ops=frozenset({op})))(x)
    everything = adapter.build(QuantConfig(fp32_ops=frozenset(adapter.space.op_names)))
    assert torch.allclose(everything(x), model(x), atol=1e-5)
