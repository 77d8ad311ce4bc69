"""``module:function`` entry points of the digits example for YAML jobs (configs/digits-fx.yaml).

The three callables share one trained model per (seed, fragile) within a process, so a job
trains once (about 15 s) however many of them it calls.
"""

from __future__ import annotations

from functools import lru_cache

from torch import nn

from autoquant.examples import digits_onnx
from autoquant.examples.digits import DigitsData, DigitsNet, accuracy_fn, prepare


@lru_cache(maxsize=4)
def _prepared(seed: int, fragile: bool) -> tuple[DigitsData, DigitsNet, object]:
    return prepare(seed=seed, fragile=fragile)


def model(seed: int = 0, fragile: bool = False) -> DigitsNet:
    """The trained DigitsNet (with the outlier channel when ``fragile``)."""
    return _prepared(seed, fragile)[1]


def calibration_data(seed: int = 0, fragile: bool = False, n_samples: int = 512) -> list:
    """Training-image batches (never test images)."""
    return _prepared(seed, fragile)[0].calibration_batches(n_samples)


def eval_fn(candidate: nn.Module, seed: int = 0, fragile: bool = False) -> float:
    """Top-1 accuracy on the held-out images."""
    return accuracy_fn(_prepared(seed, fragile)[0])(candidate)


# --- the same model on ONNX Runtime (configs/digits-onnx.yaml) -----------------------------------
@lru_cache(maxsize=4)
def onnx_model(seed: int = 0, fragile: bool = False):
    """The trained DigitsNet exported to ONNX (an onnx.ModelProto)."""
    return digits_onnx.export(model(seed, fragile))


def onnx_calibration_data(seed: int = 0, fragile: bool = False, n_samples: int = 512) -> list:
    """Training images as ONNX feeds ({"images": array})."""
    return digits_onnx.calibration_batches(_prepared(seed, fragile)[0], n_samples)


def onnx_eval_fn(session, seed: int = 0, fragile: bool = False) -> float:  # noqa: ANN001 (InferenceSession)
    """Top-1 accuracy of an ONNX Runtime session on the held-out images."""
    return digits_onnx.accuracy_fn(_prepared(seed, fragile)[0])(session)
