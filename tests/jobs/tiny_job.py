"""Entry points of a tiny real FX job for CLI, resume and distributed tests.

Two searchable ops (a Conv+ReLU and a Linear). ``eval_fn`` is minus the mean squared error
against the FP32 outputs, so every candidate is a little worse than FP32 and an absolute
criterion of 0 is never met (the job runs until its grid or max_trials is exhausted). It sleeps
``AQ_TEST_EVAL_SLEEP`` seconds per call, so a test can kill a job in the middle.
"""

from __future__ import annotations

import os
import time
from functools import lru_cache

import torch
from torch import nn


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(8 * 6 * 6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.relu(self.conv(x)), 1))


@lru_cache(maxsize=1)
def model() -> Tiny:
    torch.manual_seed(0)
    return Tiny().eval()


@lru_cache(maxsize=1)
def _inputs() -> torch.Tensor:
    return torch.randn(32, 3, 6, 6, generator=torch.Generator().manual_seed(1))


def calibration() -> list[torch.Tensor]:
    return list(_inputs().split(8))


def eval_fn(candidate: nn.Module) -> float:
    time.sleep(float(os.environ.get("AQ_TEST_EVAL_SLEEP", "0")))
    with torch.inference_mode():
        reference = model()(_inputs())
        error = float(((candidate(_inputs()) - reference) ** 2).mean())
    # Every candidate counts as worse than FP32, the all-FP32 one included (it is not the FP32 model).
    return -error - (0.0 if candidate is model() else 1e-9)
