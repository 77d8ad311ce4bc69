"""A structural model zoo: the architectures users bring, random-initialised from configs.

Why these models: our own small CNNs never showed what real models break (issue 14). Each entry
carries structures an adapter must handle:

- ResNet, RegNet: residual adds after BatchNorm, grouped convs (RegNet's Y blocks add
  squeeze-and-excitation).
- MobileNetV2, EfficientNet: depthwise-separable inverted residuals, ReLU6 / SiLU, TF "same"
  padding done with ``F.pad`` before the conv, squeeze-and-excitation (EfficientNet).
- ConvNeXt: depthwise 7x7 convs, LayerNorm over channels, Linear layers on NHWC tensors, layer scale.
- MobileViT: convs and transformer blocks in one network, unfold/fold reshapes.
- ViT: patch-embedding conv, then a pure transformer.
- BERT, DistilBERT, RoBERTa, ALBERT (shared weights, factorised embedding), DeBERTa-v2
  (disentangled relative attention): Hugging Face text encoders with ModuleList layers and
  ModelOutput (dict) outputs, fed dicts of input_ids and attention_mask.
- ``tf_effnet`` (torch.nn): the model of issue 14, an EfficientNet/TF-style CNN whose convs are an
  ``nn.Conv2d`` subclass with its own ``forward`` (explicit "same" padding, then ``F.conv2d``), BN
  after each conv, ReLU6, residual adds, squeeze-and-excitation (``mul`` by a sigmoid gate) and hardswish.
- ``dense_unet`` (torch.nn): DenseNet/Inception-style concatenation and upsampling (a small U-Net).

Nothing is downloaded: every model is built from a config with a fixed seed, so the same name and
size always give the same weights and data. ``size="ci"`` is tiny (64x64 images, sequence 16,
hidden 32) for the test suite; ``size="bench"`` is realistic (224x224 images, sequence 128) for
``experiments/zoo.py``.

Held-out cases: the entries marked ``held_out=True`` (``regnet`` and ``albert``) are kept out of the
design loop. Whoever works on the adapters or strategies must not tune on them or look at their
numbers while designing; the zoo table reports them separately, as the honest test of a change.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

SIZES = ("ci", "bench")
KINDS = ("cnn", "vit", "text")
SEED = 0
CALIB_BATCHES = 4
# size -> (batch size, image side, sequence length)
_SHAPES = {"ci": (2, 64, 16), "bench": (8, 224, 128)}
_VOCAB = 1000
_IMAGE_INPUT = "pixel_values"


@dataclass(frozen=True)
class ZooCase:
    """A built zoo model: FP32, eval mode, with its calibration batches and one example batch.

    Image batches are tensors (the model's first positional input); text batches are dicts of
    keyword inputs. ``feeds`` gives the same batches as the ONNX export's numpy inputs.
    """

    name: str
    kind: str
    model: nn.Module
    calib_batches: list[Any]
    example: Any

    def feeds(self, batches: list[Any] | None = None) -> list[dict[str, np.ndarray]]:
        """Batches (default: the calibration batches) as ONNX Runtime feeds keyed by input name."""
        return [as_feeds(b) for b in (self.calib_batches if batches is None else batches)]


@dataclass(frozen=True)
class ZooEntry:
    name: str
    kind: str
    make: Callable[[str], nn.Module] = field(repr=False)
    held_out: bool = False

    def build(self, size: str = "ci") -> ZooCase:
        """The model in eval mode and its inputs; the same weights and data on every call."""
        if size not in SIZES:
            raise ValueError(f"Unknown zoo size '{size}': use one of {SIZES}.")
        torch.manual_seed(SEED)
        model = self.make(size)
        generator = torch.Generator().manual_seed(SEED + 1)
        make_batch = _text_batch if self.kind == "text" else _image_batch
        batches = [make_batch(size, generator) for _ in range(CALIB_BATCHES + 1)]
        _trained_like(model, [make_batch(size, generator) for _ in range(CALIB_BATCHES)])
        return ZooCase(self.name, self.kind, model, batches[:-1], batches[-1])


def _image_batch(size: str, generator: torch.Generator) -> torch.Tensor:
    batch, side, _ = _SHAPES[size]
    return torch.randn(batch, 3, side, side, generator=generator)


def _text_batch(size: str, generator: torch.Generator) -> dict[str, torch.Tensor]:
    batch, _, length = _SHAPES[size]
    ids = torch.randint(4, _VOCAB, (batch, length), generator=generator)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1:, length * 3 // 4:] = 0  # padded rows, as a tokenizer's batch has
    ids[mask == 0] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _trained_like(model: nn.Module, batches: list[Any]) -> None:
    """Weights with the scales of a trained network, so activations neither vanish nor explode.

    Some Hugging Face inits (normal(0.02) convs, zero-init heads) make a deep random CNN output
    exact zeros, which no quantization check can tell apart. Convs and Linears take torch's
    default init, norms a spread of affine parameters, and BatchNorm statistics are measured on
    data (train-mode passes), as after training: then BN folding and activation ranges are real.
    """
    norms = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
            module.reset_parameters()
        elif isinstance(module, norms) and getattr(module, "weight", None) is not None:
            with torch.no_grad():
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.2)
    batch_norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if batch_norms:
        for bn in batch_norms:
            bn.reset_running_stats()
            bn.momentum = None  # a plain average over the passes
        model.train()
        with torch.no_grad():
            for batch in batches:
                model(**batch) if isinstance(batch, Mapping) else model(batch)
        for bn in batch_norms:
            bn.momentum = 0.1
    model.eval()


def as_feeds(batch: Any) -> dict[str, np.ndarray]:
    """One zoo batch as ONNX Runtime feeds (the export's input names)."""
    if isinstance(batch, Mapping):
        return {name: value.numpy() for name, value in batch.items()}
    return {_IMAGE_INPUT: batch.numpy()}


# --- Hugging Face models (built from configs, random init) ---------------------------------------------
def _hf(model_class: str, config_class: str, ci: dict[str, Any], bench: dict[str, Any],
        eager: bool = False) -> Callable[[str], nn.Module]:
    def make(size: str) -> nn.Module:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import transformers

        config = getattr(transformers, config_class)(num_labels=10, **(ci if size == "ci" else bench))
        # Eager attention exports to ONNX as MatMul/Softmax/MatMul; SDPA adds guards that cost speed.
        extra = {"attn_implementation": "eager"} if eager else {}
        return getattr(transformers, model_class)._from_config(config, **extra)

    return make


def _text(model_class: str, config_class: str, ci: dict[str, Any], bench: dict[str, Any]) -> Callable[[str], nn.Module]:
    return _hf(model_class, config_class, {"vocab_size": _VOCAB, **ci}, {"vocab_size": _VOCAB, **bench}, eager=True)


_BERT_CI = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
_BERT_BENCH = {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 1024}
_DEBERTA = {"relative_attention": True, "pos_att_type": ["p2c", "c2p"], "position_biased_input": False,
            "max_relative_positions": -1}

_HF_ENTRIES = [
    ZooEntry("resnet", "cnn", _hf(
        "ResNetForImageClassification", "ResNetConfig",
        {"embedding_size": 16, "hidden_sizes": [16, 32, 64, 128], "depths": [1, 1, 1, 1], "layer_type": "basic"},
        {"embedding_size": 64, "hidden_sizes": [64, 128, 256, 512], "depths": [2, 2, 2, 2], "layer_type": "basic"})),
    ZooEntry("mobilenet_v2", "cnn", _hf(
        "MobileNetV2ForImageClassification", "MobileNetV2Config",
        {"depth_multiplier": 0.35, "image_size": 64},
        {"depth_multiplier": 1.0, "image_size": 224})),
    ZooEntry("efficientnet", "cnn", _hf(
        "EfficientNetForImageClassification", "EfficientNetConfig",
        {"width_coefficient": 0.25, "depth_coefficient": 0.5, "image_size": 64, "hidden_dim": 320},
        {"width_coefficient": 1.0, "depth_coefficient": 1.0, "image_size": 224, "hidden_dim": 1280,
         "dropout_rate": 0.2})),
    ZooEntry("convnext", "cnn", _hf(
        "ConvNextForImageClassification", "ConvNextConfig",
        {"hidden_sizes": [16, 32, 64, 128], "depths": [1, 1, 1, 1], "image_size": 64},
        {"hidden_sizes": [48, 96, 192, 384], "depths": [2, 2, 4, 2], "image_size": 224})),
    ZooEntry("regnet", "cnn", _hf(
        "RegNetForImageClassification", "RegNetConfig",
        {"embedding_size": 16, "hidden_sizes": [16, 32, 64, 128], "depths": [1, 1, 1, 1], "groups_width": 8},
        {"embedding_size": 32, "hidden_sizes": [48, 104, 208, 440], "depths": [1, 3, 6, 6], "groups_width": 8}),
        held_out=True),
    ZooEntry("mobilevit", "vit", _hf(
        "MobileViTForImageClassification", "MobileViTConfig",
        {"image_size": 64, "hidden_sizes": [32, 48, 64], "neck_hidden_sizes": [8, 16, 24, 32, 40, 48, 96],
         "num_attention_heads": 2},
        {"image_size": 224, "hidden_sizes": [96, 120, 144], "neck_hidden_sizes": [16, 32, 48, 64, 80, 96, 384]})),
    ZooEntry("vit", "vit", _hf(
        "ViTForImageClassification", "ViTConfig",
        {"image_size": 64, "patch_size": 16, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
         "intermediate_size": 64},
        {"image_size": 224, "patch_size": 16, "hidden_size": 192, "num_hidden_layers": 12, "num_attention_heads": 3,
         "intermediate_size": 768},
        eager=True)),
    ZooEntry("bert", "text", _text("BertForSequenceClassification", "BertConfig", _BERT_CI, _BERT_BENCH)),
    ZooEntry("distilbert", "text", _text(
        "DistilBertForSequenceClassification", "DistilBertConfig",
        {"dim": 32, "n_layers": 2, "n_heads": 2, "hidden_dim": 64},
        {"dim": 256, "n_layers": 4, "n_heads": 4, "hidden_dim": 1024})),
    ZooEntry("roberta", "text", _text(
        "RobertaForSequenceClassification", "RobertaConfig", _BERT_CI, _BERT_BENCH)),
    ZooEntry("albert", "text", _text(
        "AlbertForSequenceClassification", "AlbertConfig",
        {**_BERT_CI, "embedding_size": 16}, {**_BERT_BENCH, "embedding_size": 128}),
        held_out=True),
    ZooEntry("deberta_v2", "text", _text(
        "DebertaV2ForSequenceClassification", "DebertaV2Config",
        {**_BERT_CI, **_DEBERTA}, {**_BERT_BENCH, **_DEBERTA})),
]


# --- torch.nn models for the structures the Hugging Face ones miss -----------------------------------
class Conv2dSame(nn.Conv2d):
    """TensorFlow "same" padding written out, as EfficientNet ports do: pad, then ``F.conv2d``.

    A Conv2d subclass with its own ``forward``: FX traces through it to a functional conv. The
    padding is fixed at construction (TF's rule for inputs whose size the stride divides), so the
    model stays traceable.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        geometry = zip(self.kernel_size, self.stride, self.dilation, strict=True)
        total = [max((k - 1) * d + 1 - s, 0) for k, s, d in geometry]
        self.same_pad = [total[1] // 2, total[1] - total[1] // 2, total[0] // 2, total[0] - total[0] // 2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, self.same_pad)
        return F.conv2d(x, self.weight, self.bias, self.stride, (0, 0), self.dilation, self.groups)


def _conv_bn(cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [Conv2dSame(cin, cout, kernel, stride, groups=groups, bias=False), nn.BatchNorm2d(cout)]


class SqueezeExcite(nn.Module):
    """Channel attention: the features times a sigmoid gate computed from their mean."""

    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, reduced, 1)
        self.expand = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.expand(F.relu(self.reduce(x.mean((2, 3), keepdim=True))))
        return x * torch.sigmoid(gate)


class InvertedResidual(nn.Module):
    """Expand (1x1), depthwise (kxk), squeeze-excite, project (1x1); residual add when shapes match."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int = 4, kernel: int = 3) -> None:
        super().__init__()
        mid = cin * expand
        self.expand = nn.Sequential(*_conv_bn(cin, mid), nn.ReLU6())
        self.depthwise = nn.Sequential(*_conv_bn(mid, mid, kernel, stride, groups=mid), nn.ReLU6())
        self.se = SqueezeExcite(mid, max(cin // 4, 4))
        self.project = nn.Sequential(*_conv_bn(mid, cout))
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.se(self.depthwise(self.expand(x))))
        return x + y if self.residual else y


class TFEfficientNet(nn.Module):
    """The issue-14 structure: Conv2dSame + BN everywhere, ReLU6, residual adds, SE, a hardswish head."""

    def __init__(self, widths: list[int], repeats: int, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn(3, widths[0], 3, 2), nn.ReLU6())
        blocks = []
        for cin, cout in zip(widths, widths[1:], strict=False):
            blocks.append(InvertedResidual(cin, cout, stride=2))
            blocks += [InvertedResidual(cout, cout, stride=1, kernel=5) for _ in range(repeats)]
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(*_conv_bn(widths[-1], widths[-1] * 4), nn.Hardswish())
        self.dropout = nn.Dropout(0.2)
        self.classifier = nn.Linear(widths[-1] * 4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.blocks(self.stem(x)))
        return self.classifier(self.dropout(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)))


class DenseBlock(nn.Module):
    """DenseNet style: each layer reads the concatenation of all earlier outputs."""

    def __init__(self, cin: int, growth: int, layers: int) -> None:
        super().__init__()
        widths = [cin + i * growth for i in range(layers)]
        self.layers = nn.ModuleList(
            nn.Sequential(nn.BatchNorm2d(w), nn.ReLU(), nn.Conv2d(w, growth, 3, padding=1)) for w in widths
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.layers:
            features.append(layer(torch.cat(features, 1)))
        return torch.cat(features, 1)


class DenseUNet(nn.Module):
    """Dense blocks going down, upsampling and skip concatenations coming back up, then a classifier."""

    def __init__(self, width: int, growth: int, layers: int, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, stride=2, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.down1 = DenseBlock(width, growth, layers)
        c1 = width + layers * growth
        self.pool = nn.MaxPool2d(2)
        self.down2 = DenseBlock(c1, growth, layers)
        c2 = c1 + layers * growth
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.fuse = nn.Sequential(nn.Conv2d(c2 + c1, width, 1), nn.BatchNorm2d(width), nn.ReLU())
        self.branch3 = nn.Conv2d(width, width, 3, padding=1)  # Inception-style parallel branches
        self.branch1 = nn.Conv2d(width, width, 1)
        self.classifier = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.down1(self.stem(x))
        deep = self.down2(self.pool(skip))
        x = self.fuse(torch.cat([self.up(deep), skip], 1))
        x = F.interpolate(x, scale_factor=0.5, mode="bilinear", align_corners=False)
        x = torch.cat([self.branch3(x), self.branch1(x)], 1)
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(F.relu(x), 1), 1))


_TORCH_ENTRIES = [
    ZooEntry("tf_effnet", "cnn", lambda size: TFEfficientNet(
        [8, 16, 24, 32] if size == "ci" else [32, 48, 96, 160, 224], repeats=1 if size == "ci" else 2)),
    ZooEntry("dense_unet", "cnn", lambda size: DenseUNet(
        *((8, 4, 2) if size == "ci" else (32, 16, 4)))),
]

ZOO: dict[str, ZooEntry] = {entry.name: entry for entry in _HF_ENTRIES + _TORCH_ENTRIES}
HELD_OUT = tuple(name for name, entry in ZOO.items() if entry.held_out)


# --- ONNX export --------------------------------------------------------------------------------------
class _Positional(nn.Module):
    """Positional inputs in export order to the model's keyword inputs; ModelOutput to a tuple."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *inputs: torch.Tensor) -> Any:
        if self.names == [_IMAGE_INPUT]:
            out = self.model(*inputs)
        else:
            out = self.model(**dict(zip(self.names, inputs, strict=False)))
        return tuple(out.values()) if isinstance(out, Mapping) else out


def export_onnx(model: nn.Module | ZooCase, example: Any = None, path: str | os.PathLike | None = None) -> bytes:
    """The model as ONNX (opset 17, TorchScript exporter), dynamic batch and, for text, sequence.

    ``model`` is a ZooCase (its example is used) or a module with ``example`` (a tensor, or a dict
    of text inputs). Inputs are named ``pixel_values`` or ``input_ids``/``attention_mask``; outputs
    after the model's output keys (``logits``). Writes ``path`` if given; returns the bytes.
    """
    if isinstance(model, ZooCase):
        model, example = model.model, model.example if example is None else example
    if example is None:
        raise ValueError("export_onnx needs an example batch for a bare module.")
    names = list(example) if isinstance(example, Mapping) else [_IMAGE_INPUT]
    inputs = tuple(example[n] for n in names) if isinstance(example, Mapping) else (example,)
    with torch.no_grad():
        out = model(**example) if isinstance(example, Mapping) else model(example)
    outputs = list(out.keys()) if isinstance(out, Mapping) else ["output"]
    axes = {n: {0: "batch", 1: "sequence"} if isinstance(example, Mapping) else {0: "batch"} for n in names}
    axes |= {n: {0: "batch"} for n in outputs}
    buffer = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(_Positional(model, names).eval(), inputs, buffer,  # type: ignore[arg-type]  # a file works
                          dynamo=False, opset_version=17, input_names=names, output_names=outputs, dynamic_axes=axes)
    data = buffer.getvalue()
    if path is not None:
        Path(path).write_bytes(data)
    return data
