"""SmoothQuant scale migration (Xiao et al., 2023), numpy only, shared by every adapter.

A few activation channels of a transformer carry values ~100x larger than the rest, so one
per-tensor INT8 scale for the activation wastes most of its levels. ``X @ W`` equals
``(X / s) @ (diag(s) W)`` for any positive per-input-channel ``s``: dividing the activation by
``s = amax_x**alpha / amax_w**(1 - alpha)`` moves part of its range into the weight, which is
quantized per output channel and tolerates it. ``alpha`` = 0 leaves the activation alone, 1 moves
all of it. The division is folded into the producer where one is linear per channel (a
LayerNorm's gamma and beta), else it is an explicit multiply before the MatMul; the multiplication
goes into the weight. Activation abs-max per channel comes from the calibration statistics
(``TensorStats(channels=True).channel_absmax``), so changing ``alpha`` needs no new calibration pass.

Weights here are given with their input-channel axis: ``in_axis=0`` for an ONNX MatMul weight
(K x N), ``in_axis=1`` for a torch ``Linear.weight`` (out x in).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from autoquant.calibration import TensorStats
from autoquant.errors import ConfigError

__all__ = ["ALPHAS", "check_alpha", "fold_into_norm", "fold_into_weight", "smoothed_range", "smoothing_scales",
           "weight_absmax"]

# The grid the search tries (None = no smoothing first): SmoothQuant's 0.5 default and the larger
# values its authors and NNCF use for BERT-like encoders.
ALPHAS = (None, 0.5, 0.65, 0.8)
# Scales are clipped to [1 / _MAX_SCALE, _MAX_SCALE]: a dead channel (amax 0) must not make an
# infinite or zero factor.
_MAX_SCALE = 1e4


def check_alpha(alpha: object) -> float | None:
    """``alpha`` as a float in [0, 1], or None (no smoothing); anything else is a ConfigError."""
    if alpha is None:
        return None
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.floating)) or not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"smooth_alpha must be a number in [0, 1] or null (no smoothing), got {alpha!r}; "
                          f"e.g. {ALPHAS[1]}.")
    return float(alpha)


def weight_absmax(weights: list[ArrayLike], in_axis: int) -> np.ndarray:
    """Per-input-channel abs-max over one or more weights that read the same activation (the
    Q, K and V projections share one LayerNorm output, hence one scale)."""
    maxes = [np.abs(np.moveaxis(np.asarray(w, dtype=np.float64), in_axis, 0)).reshape(np.shape(w)[in_axis], -1)
             .max(axis=1) for w in weights]
    if len({m.shape for m in maxes}) != 1:
        raise ConfigError(f"Weights sharing an activation must have the same input channels, got "
                          f"{[m.size for m in maxes]}.")
    return np.max(maxes, axis=0)


def smoothing_scales(act_absmax: ArrayLike, w_absmax: ArrayLike, alpha: float | None) -> np.ndarray:
    """Per-input-channel ``s = amax_x**alpha / amax_w**(1 - alpha)`` (float32); channels where
    either max is 0 get 1."""
    a, w = np.asarray(act_absmax, dtype=np.float64), np.asarray(w_absmax, dtype=np.float64)
    if a.shape != w.shape:
        raise ConfigError(f"Activation has {a.size} channels but the weight has {w.size} input channels.")
    if (alpha := check_alpha(alpha)) is None:
        return np.ones(a.shape, np.float32)
    live = (a > 0) & (w > 0)
    s = np.where(live, np.power(np.where(live, a, 1.0), alpha) / np.power(np.where(live, w, 1.0), 1.0 - alpha), 1.0)
    return np.clip(s, 1.0 / _MAX_SCALE, _MAX_SCALE).astype(np.float32)


def fold_into_norm(gamma: ArrayLike, beta: ArrayLike | None, s: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """The normalisation's (gamma / s, beta / s): its output comes out divided by ``s``."""
    gamma = np.asarray(gamma)
    return (gamma / s).astype(gamma.dtype), None if beta is None else (np.asarray(beta) / s).astype(gamma.dtype)


def fold_into_weight(weight: ArrayLike, s: np.ndarray, in_axis: int) -> np.ndarray:
    """``weight`` with input channel i multiplied by ``s[i]``."""
    weight = np.asarray(weight)
    shape = [1] * weight.ndim
    shape[in_axis] = s.size
    return (weight * s.reshape(shape)).astype(weight.dtype)


def smoothed_range(stats: TensorStats, inverse: ArrayLike, symmetric: bool) -> tuple[float, float]:
    """Min-max of the activation times ``inverse`` (1 / s), from its per-channel extremes: exact
    for the smoothed tensor, so no calibration pass per alpha."""
    if stats.channel_min is None or stats.channel_max is None:
        raise ValueError("no per-channel statistics for a smoothed tensor (an autoquant bug: report it)")
    inv = np.asarray(inverse, dtype=np.float64)
    lo = float(min(0.0, (stats.channel_min * inv).min()))
    hi = float(max(0.0, (stats.channel_max * inv).max()))
    return (-max(-lo, hi), max(-lo, hi)) if symmetric else (lo, hi)
