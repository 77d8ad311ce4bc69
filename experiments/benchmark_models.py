"""Three architectures the benchmark trains offline: on scikit-learn digits (32x32), a MobileNet-style
depthwise-separable CNN and a small transformer-encoder classifier over 4x4 patches; on a synthetic
tabular task with a large test split (scikit-learn's ``make_classification``), a residual MLP. Built
with torch.nn only, trained in seconds, deterministic for a seed."""

from __future__ import annotations

from typing import TypeVar

import torch
from sklearn.datasets import make_classification
from torch import nn
from torch.nn import functional as F

from autoquant.examples.digits import IMAGE_SIZE, DigitsData, fit

M = TypeVar("M", bound=nn.Module)


def _conv_bn(c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(c_out),
            nn.ReLU6()]


class DepthwiseNet(nn.Module):
    """MobileNet-v1 style: a stem, five depthwise 3x3 + pointwise 1x1 pairs, global pooling, a classifier
    (12 Conv/Linear ops)."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        layers = _conv_bn(1, width, 3)
        plan = [(width, 2 * width, 2), (2 * width, 2 * width, 1), (2 * width, 4 * width, 2), (4 * width, 4 * width, 1),
                (4 * width, 8 * width, 2)]
        for c_in, c_out, stride in plan:
            layers += _conv_bn(c_in, c_in, 3, stride, groups=c_in) + _conv_bn(c_in, c_out, 1)
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(8 * width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


class EncoderBlock(nn.Module):
    """Pre-norm self-attention and MLP, written with Linear layers and matmuls (FX-traceable)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attention = torch.softmax(torch.matmul(q, k.transpose(-2, -1)) * (d // self.heads) ** -0.5, dim=-1)
        x = x + self.proj(torch.matmul(attention, v).transpose(1, 2).reshape(b, n, d))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class PatchTransformer(nn.Module):
    """4x4 patches of the 32x32 image as 64 tokens, two encoder blocks, mean pooling, a classifier."""

    def __init__(self, dim: int = 64, heads: int = 4, depth: int = 2, patch: int = 4) -> None:
        super().__init__()
        self.patch = patch
        self.embed = nn.Linear(patch * patch, dim)
        self.position = nn.Parameter(torch.zeros(1, (IMAGE_SIZE // patch) ** 2, dim))
        self.blocks = nn.Sequential(*[EncoderBlock(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p, grid = self.patch, IMAGE_SIZE // self.patch
        patches = x.reshape(x.shape[0], grid, p, grid, p).permute(0, 1, 3, 2, 4).reshape(x.shape[0], grid * grid, p * p)
        tokens = self.blocks(self.embed(patches) + self.position)
        return self.head(self.norm(tokens).mean(1))


def train(model: M, data: DigitsData, *, epochs: int, lr: float, seed: int = 0) -> M:
    torch.manual_seed(seed)
    return fit(model, data, epochs=epochs, lr=lr, seed=seed, optimizer=torch.optim.AdamW)


def depthwise_net(data: DigitsData, seed: int = 0) -> DepthwiseNet:
    torch.manual_seed(seed)
    return train(DepthwiseNet(), data, epochs=10, lr=3e-3, seed=seed)


def patch_transformer(data: DigitsData, seed: int = 0) -> PatchTransformer:
    torch.manual_seed(seed)
    return train(PatchTransformer(), data, epochs=8, lr=2e-3, seed=seed)


class ResidualMLP(nn.Module):
    """A stem, three pre-activation residual blocks (Linear-ReLU-Linear plus the input) and a head (8 Linear ops)."""

    def __init__(self, features: int = 64, width: int = 256, depth: int = 3, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Linear(features, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width)) for _ in range(depth))
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = x + block(x)
        return self.head(F.relu(x))


TABULAR_TRAIN, TABULAR_TEST = 8000, 5000  # 0.1% of the test split is 5 samples, not a fraction of one


def tabular_data(seed: int = 0) -> DigitsData:
    """A 10-class synthetic task (64 features, 24 informative), standardized with the train split's statistics."""
    x, y = make_classification(TABULAR_TRAIN + TABULAR_TEST, n_features=64, n_informative=24, n_redundant=8,
                               n_classes=10, n_clusters_per_class=2, class_sep=1.5, random_state=seed)
    x, y = torch.tensor(x, dtype=torch.float32), torch.tensor(y)
    train, test = slice(0, TABULAR_TRAIN), slice(TABULAR_TRAIN, None)
    mean, std = x[train].mean(0), x[train].std(0)
    x = (x - mean) / std
    return DigitsData((x[train], y[train]), (x[test], y[test]))


def residual_mlp(data: DigitsData, seed: int = 0) -> ResidualMLP:
    torch.manual_seed(seed)
    return train(ResidualMLP(), data, epochs=15, lr=1e-3, seed=seed)
