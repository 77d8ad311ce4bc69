"""The embedded example: a small residual CNN trained on scikit-learn's digits, then tuned to INT8.

Runs with nothing from the network: the data ships with scikit-learn and the model trains here in
seconds. The 8x8 digits are upsampled to 32x32 so that convolutions, not overheads, dominate the
run time, as in real vision models, and INT8 kernels pay off.

    python -m autoquant.examples.digits --strategy bayesian --relative 0.01 --out autoquant-out/digits
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
from rich.console import Console
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F

from autoquant import AccuracyCriterion, Tuner
from autoquant.progress import StderrLines
from autoquant.report import print_summary, sensitivity_table
from autoquant.strategies import STRATEGIES

M = TypeVar("M", bound=nn.Module)

IMAGE_SIZE = 32
BATCH_SIZE = 64


def conv_bn_relu(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class ResidualBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = conv_bn_relu(channels, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn2(self.conv2(self.conv1(x))) + x)


class DigitsNet(nn.Module):
    """conv-bn-relu blocks with residual adds, three poolings, a two-layer classifier."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            conv_bn_relu(1, width), ResidualBlock(width), nn.MaxPool2d(2),
            conv_bn_relu(width, 2 * width), ResidualBlock(2 * width), nn.MaxPool2d(2),
            conv_bn_relu(2 * width, 4 * width), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(4 * width * (IMAGE_SIZE // 8) ** 2, 128), nn.ReLU(), nn.Linear(128, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@dataclass
class DigitsData:
    train: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]

    def calibration_batches(self, n_samples: int = 512) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Training images (never test images), as (images, labels) batches."""
        x, y = self.train
        return [(x[i:i + BATCH_SIZE], y[i:i + BATCH_SIZE]) for i in range(0, min(n_samples, len(x)), BATCH_SIZE)]


def load_data(seed: int = 0) -> DigitsData:
    digits = load_digits()
    images = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
    images = F.interpolate(images, size=IMAGE_SIZE, mode="bilinear", align_corners=False)
    images = (images - images.mean()) / images.std()
    labels = torch.tensor(digits.target)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    train, test = order[:1200], order[1200:]
    return DigitsData((images[train], labels[train]), (images[test], labels[test]))


def train_model(data: DigitsData, *, epochs: int = 6, seed: int = 0) -> DigitsNet:
    torch.manual_seed(seed)
    return fit(DigitsNet(), data, epochs=epochs, lr=3e-3, seed=seed)


def fit(model: M, data: DigitsData, *, epochs: int, lr: float, seed: int = 0,
        optimizer: Callable[..., torch.optim.Optimizer] = torch.optim.Adam) -> M:
    """Cross-entropy training on ``data.train`` in shuffled mini-batches (the shuffle seeded); eval mode."""
    steps = optimizer(model.parameters(), lr=lr)
    x, y = data.train
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=generator).split(BATCH_SIZE):
            steps.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            steps.step()
    return model.eval()


def make_fragile(model: DigitsNet, images: torch.Tensor, *, scale: float = 300.0) -> DigitsNet:
    """The same function, with one outlier channel between the two classifier layers.

    The hidden layer's most active channel on ``images`` is multiplied by ``scale`` and divided
    back in the next layer, like the outlier features of real transformers: FP32 outputs are
    unchanged, but a per-tensor INT8 range stretched by the outlier crushes every other channel.
    """
    hidden, head = model.classifier[1], model.classifier[3]
    assert isinstance(hidden, nn.Linear) and isinstance(head, nn.Linear)
    with torch.no_grad():
        activations = F.relu(hidden(model.classifier[0](model.features(images))))
        channel = int(activations.mean(0).argmax())
        hidden.weight[channel] *= scale
        hidden.bias[channel] *= scale
        head.weight[:, channel] /= scale
    return model


def accuracy_fn(data: DigitsData):
    """eval_fn: top-1 accuracy on the held-out images."""
    x, y = data.test

    def accuracy(model: nn.Module) -> float:
        with torch.inference_mode():
            predictions = torch.cat([model(batch).argmax(1) for batch in x.split(256)])
        return (predictions == y).float().mean().item()

    return accuracy


def prepare(*, seed: int = 0, fragile: bool = False) -> tuple[DigitsData, DigitsNet, Callable[[nn.Module], float]]:
    """The data, a freshly trained model (made fragile on request) and its eval_fn."""
    data = load_data(seed)
    model = train_model(data, seed=seed)
    if fragile:
        make_fragile(model, data.train[0][:512])
    return data, model, accuracy_fn(data)


def example_args(argv: list[str] | None, description: str, default_out: str) -> argparse.Namespace:
    """The command line shared by the digits examples (both backends)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--strategy", default="sensitivity", choices=sorted(STRATEGIES))
    parser.add_argument("--relative", type=float, default=0.01, help="tolerated relative accuracy loss")
    parser.add_argument("--max-trials", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=default_out, help="folder for the model, result and history")
    parser.add_argument("--fragile", action="store_true",
                        help="add one transformer-style outlier channel (FP32 unchanged; naive INT8 suffers)")
    args = parser.parse_args(argv)
    # autoquant's own handler: on a terminal the tuner draws its progress display under the lines
    logging.basicConfig(level=logging.INFO, handlers=[StderrLines("%(asctime)s %(message)s", "%H:%M:%S")])
    return args


def tune_and_report(args: argparse.Namespace, model: object, calibration: list, eval_fn: Callable,
                    console: Console) -> None:
    """Tune, print the summary and the sensitivity ranking, save the result."""
    tuner = Tuner(AccuracyCriterion(relative=args.relative), strategy=args.strategy,
                  max_trials=args.max_trials, seed=args.seed)
    result = tuner.tune(model, calibration, eval_fn)
    print_summary(result, console)
    if result.sensitivity is not None:
        console.print(sensitivity_table(result.sensitivity, result.fp32_ops))
    result.save(args.out)
    console.print(f"Saved the INT8 model, result.json and history.csv to {args.out}/")


def main(argv: list[str] | None = None) -> None:
    args = example_args(argv, __doc__.split("\n\n")[0], "autoquant-out/digits")
    console = Console()
    start = time.perf_counter()
    data, model, eval_fn = prepare(seed=args.seed, fragile=args.fragile)
    console.print(f"Trained DigitsNet{' (fragile)' if args.fragile else ''} in {time.perf_counter() - start:.1f} s: "
                  f"test accuracy {eval_fn(model):.4f}")
    tune_and_report(args, model, data.calibration_batches(), eval_fn, console)


if __name__ == "__main__":
    main()


__all__ = ["DigitsNet", "accuracy_fn", "load_data", "main", "make_fragile", "prepare", "train_model"]
