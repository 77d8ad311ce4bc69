"""Calibration math shared by every backend: streaming activation statistics and range selection.

``TensorStats`` keeps, for one tensor, the exact min/max and a fixed-size histogram over all
calibration batches; ``compute_range`` turns those into the (lo, hi) range a quantizer uses, by
one of ``METHODS`` (name -> range function: the one table of method names). Numpy only, so the
PyTorch FX and ONNX Runtime adapters share it. Modelled on
ONNX Runtime's ``calibrate.py``, but vectorised.

The histogram covers [-R, R] with an even number of bins, so 0 is an edge and folding it gives the
histogram of |x| without resampling. The first batch sets R = max|x|; a wider batch doubles R
until it fits and merges bins. A value's bin is floor(x * scale) and doubling R halves the scale
exactly, so the merged histogram is bit for bit the one a single pass at the final R would give.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from autoquant.errors import CalibrationDataError, ConfigError, did_you_mean

__all__ = ["METHODS", "SEARCHED", "CalibrationMethod", "TensorStats", "clipped_fraction", "compute_range",
           "overclipping", "read_stats", "write_stats"]

# The calibration values a search tries by default (autoquant.space.CALIBRATIONS), best-first.
SEARCHED = ("minmax", "entropy", "percentile-99.99", "percentile-99.999", "mse")
# Other tools' names for our methods: used for the "did you mean" hint only, never accepted.
_ALIASES = {"kl": "entropy", "kl-divergence": "entropy", "max": "minmax", "min-max": "minmax"}

# R after an all-zero first batch: any positive value works, since later batches double it.
_TINY_RANGE = 1e-30
# Values binned per step of update(): keeps the float64 temporaries in cache (about 2x faster).
_CHUNK = 1 << 16
# Mass given to a bin where P > 0 but Q = 0, in samples (ORT's smooth_distribution uses 1e-4).
_KL_EPS = 1e-4
# Entropy clips outliers, which are rare by definition: thresholds clipping a larger share of the
# values are not candidates. On sparse or spiky histograms (ReLU zeros, few distinct values,
# near-constant tensors) the KL of every threshold is mostly noise from spreading Q over P's
# nonzero bins, and its argmin can land anywhere: on a random-init MobileNetV2 it clipped 1.3% of
# the classifier input at half its range. Output SQNR vs FP32 there: TensorRT's KL 8.4 dB, honest P
# 17.5 dB, plus this bound at 1e-3 28.3 dB, at 1e-4 38.0 dB (min-max 38.2 dB).
ENTROPY_MAX_CLIPPED = 1e-4
# ... except values beyond OUTLIER_DISTANCE times the threshold, up to this share: a separated
# outlier cluster (one outlier channel of a hidden layer, 1.6% of its values, in the digits tests).
OUTLIER_DISTANCE = 4
ENTROPY_MAX_OUTLIERS = 0.05
# overclipping(): a method is flagged on a tensor where it clips more than this share of the values
# and this many times what any other method clips.
OVERCLIP_SHARE = 1e-3
OVERCLIP_FACTOR = 10.0
# MSE candidates a * (minmax range), descending so that ties keep the wider range.
_MSE_SCALES = np.arange(100, 0, -1) / 100.0


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _valid_forms() -> str:
    plain = ", ".join(repr(name) for name in METHODS if name != "percentile")
    return f"{plain}, or 'percentile-<p>' with 50 < p <= 100 (e.g. 'percentile-99.99')"


def _unknown_method(text: object) -> str:
    key = str(text).strip().lower()
    hint = did_you_mean(_ALIASES.get(key, key), [*SEARCHED, *METHODS])
    return f"Unknown calibration method {text!r}; valid forms: {_valid_forms()}.{hint}"


@dataclass(frozen=True)
class CalibrationMethod:
    """A range-selection method: ``name`` in METHODS, plus the percentile for "percentile"."""

    name: str
    percentile: float | None = None

    def __post_init__(self) -> None:
        if self.name not in METHODS:
            raise ConfigError(_unknown_method(self.name))
        if self.name != "percentile":
            if self.percentile is not None:
                raise ConfigError(
                    f"Calibration method {self.name!r} takes no percentile (got {self.percentile!r}); "
                    f"valid forms: {_valid_forms()}."
                )
            return
        if self.percentile is None:
            raise ConfigError(
                "Calibration method 'percentile' needs a value, e.g. 'percentile-99.99'; "
                f"valid forms: {_valid_forms()}."
            )
        p = float(self.percentile)
        if not 50.0 < p <= 100.0:  # also rejects nan
            raise ConfigError(
                f"The percentile must be in (50, 100], got {self.percentile!r}; e.g. 'percentile-99.99'."
            )
        object.__setattr__(self, "percentile", p)

    @classmethod
    def parse(cls, text: str | CalibrationMethod) -> CalibrationMethod:
        """Read "minmax", "entropy", "mse" or "percentile-<p>"; a CalibrationMethod passes through."""
        if isinstance(text, CalibrationMethod):
            return text
        if not isinstance(text, str):
            raise ConfigError(
                f"A calibration method must be a string, got {type(text).__name__}; valid forms: {_valid_forms()}."
            )
        name, dash, arg = text.strip().lower().partition("-")
        if name not in METHODS:
            raise ConfigError(_unknown_method(text))
        if not dash:
            return cls(name)  # "percentile" alone fails in __post_init__ with the fix
        if name != "percentile":
            raise ConfigError(
                f"Calibration method {name!r} takes no parameter, got {text!r}; valid forms: {_valid_forms()}."
            )
        try:
            p = float(arg)
        except ValueError:
            raise ConfigError(f"In {text!r}, {arg!r} is not a number; valid forms: {_valid_forms()}.") from None
        return cls(name, p)

    def __str__(self) -> str:
        if self.percentile is None:
            return self.name
        p = repr(self.percentile)  # shortest text that reads back to the same float
        return f"percentile-{p.removesuffix('.0')}"


class TensorStats:
    """Streaming statistics of one tensor over calibration batches, in O(num_bins) memory."""

    def __init__(self, num_bins: int = 2048, *, channels: bool = False) -> None:
        if not _is_int(num_bins) or num_bins < 2 or num_bins % 2:
            raise ConfigError(f"num_bins must be an even integer >= 2 (0 must be a bin edge), got {num_bins!r}.")
        self.num_bins = int(num_bins)
        # With ``channels``: the finite min and max per channel of the last axis (a MatMul's input
        # channels), what SmoothQuant's scales and the smoothed tensor's range need
        # (autoquant.smoothing); None until a batch.
        self.channels = channels
        self.channel_min: np.ndarray | None = None
        self.channel_max: np.ndarray | None = None
        self.min = math.inf
        self.max = -math.inf
        self.count = 0
        self.nonfinite = 0
        self._range = 0.0  # R; 0 until the first finite value
        # Signed bin k (-h..h-1) lives at k + h. The extra last slot holds values that land exactly
        # on +R: they belong to the last bin now but to an inner bin once R doubles.
        self._counts: np.ndarray = np.zeros(self.num_bins + 1)

    def update(self, values: ArrayLike) -> None:
        """Add a batch (any shape, any real dtype); nan and +-inf are skipped and counted."""
        x = np.asarray(values)
        if x.dtype.kind not in "biuf":
            raise ConfigError(f"Calibration values must be real numbers, got dtype {x.dtype}.")
        if self.channels and x.size:
            self._update_channels(x)
        if x.dtype not in (np.float32, np.float64):
            x = x.astype(np.float64)
        x = x.ravel()
        if x.size == 0:
            return
        lo, hi = x.min(), x.max()
        if not (np.isfinite(lo) and np.isfinite(hi)):  # nan propagates to min/max, so this is rare
            finite = np.isfinite(x)
            x = x[finite]
            self.nonfinite += finite.size - x.size
            if x.size == 0:
                return
            lo, hi = x.min(), x.max()
        lo, hi = float(lo), float(hi)
        self.count += x.size
        self.min, self.max = min(self.min, lo), max(self.max, hi)
        self._fit(max(-lo, hi))
        h, scale = self.num_bins // 2, self._scale()
        buf = np.empty(min(x.size, _CHUNK))
        for start in range(0, x.size, _CHUNK):
            y = buf[: min(_CHUNK, x.size - start)]
            # float64 whatever the input, so that |x| <= R guarantees -h <= y <= h (see _scale).
            np.multiply(x[start : start + _CHUNK], scale, out=y, dtype=np.float64)
            np.floor(y, out=y)
            y += h  # exact: y holds integers
            self._counts += np.bincount(y.astype(np.intp), minlength=self.num_bins + 1)

    @property
    def channel_absmax(self) -> np.ndarray | None:
        """max |x| per channel of the last axis (with ``channels``; None before any batch)."""
        if self.channel_min is None or self.channel_max is None:
            return None
        return np.maximum(-self.channel_min, self.channel_max)

    def _update_channels(self, x: np.ndarray) -> None:
        flat = x.reshape(-1, x.shape[-1]) if x.ndim else x.reshape(1, 1)
        finite = np.isfinite(flat)
        lo = np.where(finite, flat, np.inf).min(axis=0).astype(np.float64)
        hi = np.where(finite, flat, -np.inf).max(axis=0).astype(np.float64)
        if self.channel_min is None or self.channel_max is None:
            self.channel_min, self.channel_max = lo, hi
        elif self.channel_max.shape != hi.shape:
            raise CalibrationDataError(
                f"A calibration batch has {hi.size} channels on the last axis where earlier ones had "
                f"{self.channel_max.size}: per-channel statistics need a fixed channel count."
            )
        else:
            np.minimum(self.channel_min, lo, out=self.channel_min)
            np.maximum(self.channel_max, hi, out=self.channel_max)

    def _scale(self) -> float:
        """Bins per unit, h / R, rounded down until R * scale <= h in floating point."""
        h = self.num_bins // 2
        scale = h / self._range
        while self._range * scale > h:
            scale = math.nextafter(scale, 0.0)
        return scale  # doubling R halves it exactly (and the check above stays true)

    def _fit(self, m: float) -> None:
        """Grow R to cover max|x| = m, doubling it and merging bins so the histogram stays exact."""
        if self._range == 0.0:
            self._range = m if m > 0.0 else _TINY_RANGE
            return
        if m <= self._range:
            return
        d = max(0, math.frexp(m)[1] - math.frexp(self._range)[1] - 1)
        while math.ldexp(self._range, d) < m:
            d += 1
        h = self.num_bins // 2
        # Doubling d times maps signed bin k to floor(k / 2**d): an arithmetic shift. Shifts past 63
        # are undefined for int64, and a shift of 62 already sends every |k| <= h to 0 or -1.
        merged = (np.arange(-h, h + 1) >> min(d, 62)) + h
        self._counts = np.bincount(merged, weights=self._counts, minlength=self.num_bins + 1)
        self._range = math.ldexp(self._range, d)

    @property
    def histogram(self) -> tuple[np.ndarray, np.ndarray]:
        """(counts, edges): num_bins float64 counts over [-R, R], and the num_bins + 1 edges."""
        counts = self._counts[:-1].copy()
        counts[-1] += self._counts[-1]  # like np.histogram, the last bin includes its right edge
        h = self.num_bins // 2
        edges = np.arange(-h, h + 1) * (self._range / h)  # edges[h] is exactly 0
        return counts, edges

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON- and np.savez-able) that from_dict turns back into equal stats."""
        data = {
            "num_bins": self.num_bins,
            "min": self.min,
            "max": self.max,
            "count": self.count,
            "nonfinite": self.nonfinite,
            "range": self._range,
            "counts": self._counts.tolist(),  # num_bins + 1 slots, the last for values at +range
        }
        if self.channels:  # only then: keeps the dict np.savez-able (no None)
            data["channel_min"] = [] if self.channel_min is None else self.channel_min.tolist()
            data["channel_max"] = [] if self.channel_max is None else self.channel_max.tolist()
        return data

    @classmethod
    def from_dict(cls, d: Any) -> TensorStats:
        """Inverse of to_dict; also accepts what np.load gives back for a saved to_dict."""
        try:
            stats = cls(int(d["num_bins"]), channels="channel_max" in d)
            counts = np.asarray(d["counts"], dtype=np.float64).reshape(-1)
            if stats.channels and np.size(d["channel_max"]):
                stats.channel_min = np.asarray(d["channel_min"], dtype=np.float64).reshape(-1)
                stats.channel_max = np.asarray(d["channel_max"], dtype=np.float64).reshape(-1)
            stats.min, stats.max, stats._range = float(d["min"]), float(d["max"]), float(d["range"])
            stats.count, stats.nonfinite = int(d["count"]), int(d["nonfinite"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"Not a TensorStats.to_dict() result: {exc!r}.") from None
        if counts.shape != stats._counts.shape:
            raise ConfigError(f"TensorStats data holds {counts.size} counts, not num_bins + 1 = {stats.num_bins + 1}.")
        stats._counts = counts
        return stats

    def __repr__(self) -> str:
        return (
            f"TensorStats(count={self.count}, min={self.min:g}, max={self.max:g}, "
            f"nonfinite={self.nonfinite}, num_bins={self.num_bins})"
        )


def compute_range(
    stats: TensorStats, method: str | CalibrationMethod, *, symmetric: bool = False, num_bits: int = 8
) -> tuple[float, float]:
    """The quantization range (lo, hi) of ``stats`` by ``method``; lo <= 0 <= hi, never wider than the data.

    With ``symmetric`` the range is (-t, t). An all-zero tensor gives (0.0, 0.0).
    """
    method = CalibrationMethod.parse(method)
    if not _is_int(num_bits) or not 2 <= num_bits <= 16:
        raise ConfigError(f"num_bits must be an integer in [2, 16], got {num_bits!r}.")
    if stats.count == 0:
        raise CalibrationDataError(
            f"Cannot compute a {method} range: no finite values were observed for this tensor "
            f"({stats.nonfinite} non-finite values were skipped). Check that the calibration data "
            "reaches it and that the model produces finite activations."
        )
    t0 = max(-stats.min, stats.max, 0.0)
    if t0 == 0.0:
        return 0.0, 0.0
    lo, hi = METHODS[method.name](stats, method.percentile, symmetric, num_bits)
    if symmetric:
        t = float(min(max(-lo, hi), t0))
        return -t, t
    lo = min(float(np.clip(lo, stats.min, stats.max)), 0.0)
    hi = max(float(np.clip(hi, stats.min, stats.max)), 0.0)
    return lo, hi


# A range function: (stats, parameter or None, symmetric, num_bits) -> (lo, hi). Under
# ``symmetric`` compute_range uses max(-lo, hi); it clips to the data and keeps 0 inside.
RangeFunction = Callable[[TensorStats, float | None, bool, int], tuple[float, float]]


def _minmax_range(stats: TensorStats, _: float | None, symmetric: bool, num_bits: int) -> tuple[float, float]:
    return min(stats.min, 0.0), max(stats.max, 0.0)


def _percentile_range(stats: TensorStats, percentile: float | None, symmetric: bool,
                      num_bits: int) -> tuple[float, float]:
    assert percentile is not None  # guaranteed by CalibrationMethod
    counts, edges = stats.histogram
    q = percentile / 100.0
    if symmetric:
        t = _quantile(_fold(counts), edges[counts.size // 2:], q)
        return -t, t
    return _quantile(counts, edges, 1.0 - q), _quantile(counts, edges, q)


def _entropy_range(stats: TensorStats, _: float | None, symmetric: bool, num_bits: int) -> tuple[float, float]:
    counts, edges = stats.histogram
    # A one-signed tensor under an asymmetric scheme has every level on its side of 0.
    one_sided = not symmetric and (stats.min >= 0.0 or stats.max <= 0.0)
    levels = 2**num_bits if one_sided else 2 ** (num_bits - 1)
    t = _entropy_threshold(_fold(counts), levels) * edges[counts.size // 2 + 1]  # times the bin width
    return -t, t


def _mse_range(stats: TensorStats, _: float | None, symmetric: bool, num_bits: int) -> tuple[float, float]:
    counts, edges = stats.histogram
    lo, hi = _minmax_range(stats, None, symmetric, num_bits)
    if symmetric:
        lo, hi = -max(-lo, hi), max(-lo, hi)
    a = _mse_scale(counts, edges, lo, hi, stats.min, stats.max, num_bits)
    return a * lo, a * hi


METHODS: dict[str, RangeFunction] = {
    "minmax": _minmax_range, "entropy": _entropy_range, "percentile": _percentile_range, "mse": _mse_range,
}


def clipped_fraction(stats: TensorStats, lo: float, hi: float) -> float:
    """The share of ``stats``' values outside [lo, hi], from the histogram (bins partly outside
    count in proportion)."""
    counts, edges = stats.histogram
    outside = np.clip(lo - edges[:-1], 0.0, None) + np.clip(edges[1:] - hi, 0.0, None)
    share = np.minimum(outside / np.diff(edges), 1.0)
    return float((counts * share).sum() / max(counts.sum(), 1.0))


def overclipping(
    stats: dict[str, TensorStats], methods: list[str], *, symmetric: bool = False, ranges: Any = None
) -> dict[str, list[str]]:
    """Per method, the tensors where its range clips far more than the other methods' do:
    over OVERCLIP_SHARE of the values and OVERCLIP_FACTOR times the most any other method clips.
    ``ranges(tensor, method)``, if given, supplies (cached) ranges."""
    ranges = ranges or (lambda tensor, method: compute_range(stats[tensor], method, symmetric=symmetric))
    flagged: dict[str, list[str]] = {}
    for tensor, s in stats.items():
        if s.count == 0:
            continue
        shares = {m: clipped_fraction(s, *ranges(tensor, m)) for m in methods}
        for m, share in shares.items():
            others = max((v for k, v in shares.items() if k != m), default=0.0)
            if share > OVERCLIP_SHARE and share > OVERCLIP_FACTOR * others:
                flagged.setdefault(m, []).append(tensor)
    return flagged


def _fold(counts: np.ndarray) -> np.ndarray:
    """Histogram of |x| over [0, R] from the signed one over [-R, R] (0 is the middle edge)."""
    h = counts.size // 2
    return counts[h:] + counts[h - 1 :: -1]


def _quantile(counts: np.ndarray, edges: np.ndarray, q: float) -> float:
    """The q-quantile of a histogram, interpolating linearly inside the bin where the CDF crosses q."""
    cum = np.cumsum(counts)
    target = q * cum[-1]
    k = min(int(np.searchsorted(cum, target)), counts.size - 1)
    frac = (target - (cum[k] - counts[k])) / counts[k] if counts[k] > 0 else 0.0
    return float(edges[k] + min(max(frac, 0.0), 1.0) * (edges[k + 1] - edges[k]))


def _xlogx(x: np.ndarray) -> np.ndarray:
    """x * log(x) with 0 * log(0) = 0."""
    positive = x > 0
    return np.where(positive, x * np.log(np.where(positive, x, 1.0)), 0.0)


def _entropy_threshold(f: np.ndarray, nq: int) -> int:
    """The bin index i of the |x| histogram ``f`` whose edge, taken as the threshold, minimises
    KL(P || Q) (on ties the smallest): TensorRT's entropy calibration with an honest P."""
    # Allowed: thresholds i clipping at most ENTROPY_MAX_CLIPPED of the values within
    # OUTLIER_DISTANCE * i, and at most ENTROPY_MAX_OUTLIERS beyond (a separated outlier cluster,
    # such as one outlier channel, may be clipped; the bulk or a mode next to it may not).
    cum = np.concatenate(([0.0], np.cumsum(f)))
    i = np.arange(1, f.size + 1)
    near = cum[np.minimum(OUTLIER_DISTANCE * i, f.size)] - cum[i]
    far = cum[-1] - cum[np.minimum(OUTLIER_DISTANCE * i, f.size)]
    allowed = (near <= ENTROPY_MAX_CLIPPED * cum[-1]) & (far <= ENTROPY_MAX_OUTLIERS * cum[-1])
    lowest = int(np.argmax(allowed)) + 1  # the last threshold clips nothing: always allowed
    candidates, divergences = _kl_divergences(f, nq, lowest)
    divergences = np.where(allowed[candidates - 1], divergences, np.inf)
    return int(candidates[np.argmin(divergences)])


def _kl_divergences(f: np.ndarray, nq: int, lowest: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Every candidate threshold index i >= ``lowest`` (ascending) of the |x| histogram ``f``, and its KL(P || Q).

    P is the whole histogram. Q is what quantizing with threshold i leaves: f[:i] merged into
    ``nq`` groups (the last takes the remainder and the clipped mass, which lands on the top
    level) spread evenly over each group's bins where P > 0, and mass _KL_EPS in every nonzero
    bin beyond i. TensorRT instead takes P = f[:i] with the clipped mass added to its last bin,
    so clipping costs only the shape change of one bin: on spiky histograms (saturated ReLU6,
    near-constant channels, few distinct values) its argmin can clip most of the tensor (92% of
    one MobileNetV2 tensor, model output SQNR 38 -> 8 dB). Here each clipped sample costs about
    log(count / _KL_EPS), so rare outliers are still clipped, a mode never is.

    Since Q is constant over a group, KL = (sum P log P - sum_groups P_g log Q_g - clipped log
    _KL_EPS) / sum P + log(sum Q / sum P); with prefix sums every candidate costs O(nq), and all
    candidates run as one array operation.

    TensorRT's candidates are i >= nq (at least one bin per level). Outliers can squeeze the bulk
    of the data into a few bins, leaving no such candidate near it, so candidates i < nq are also
    tried, each judged on nq bins drawn from the histogram by linear interpolation (density
    uniform within a bin); quantization is then lossless at histogram resolution and only the
    clipping is scored. At i = nq both views coincide.
    """
    h = f.size
    cum = np.concatenate(([0.0], np.cumsum(f)))  # cum[k] = mass of bins < k
    nonzero = np.concatenate(([0], np.cumsum(f > 0)))
    plogp = np.concatenate(([0.0], np.cumsum(_xlogx(f))))
    total = cum[-1]

    # Candidates below nq: nq interpolated bins over [0, i], one per level, so Q = P inside
    # except the top bin, which also receives the clipped mass.
    small = np.arange(max(lowest, 1), min(nq - 1, h) + 1)
    top = small - small / nq  # the last fine bin is [i - i/nq, i]
    k = np.minimum(top.astype(np.intp), h - 1)
    p_top = cum[small] - (cum[k] + (top - k) * f[k])
    clipped = total - cum[small]
    inside_term = np.where(p_top > 0, p_top * np.log(np.maximum(p_top, 1e-300) / (p_top + clipped)), 0.0)
    kl_small = _kl_of(total, plogp[-1] - plogp[small] - clipped * np.log(_KL_EPS) + inside_term,
                      nonzero[-1] - nonzero[small], cum[small])

    # TensorRT's candidates, nq <= i <= h: groups of i // nq bins.
    big = np.arange(max(lowest, nq), h + 1)
    width = big // nq
    start = width[:, None] * np.arange(nq)
    end = start + width[:, None]
    end[:, -1] = big
    clipped = total - cum[big]
    p_group = cum[end] - cum[start]
    q_group = p_group.copy()
    q_group[:, -1] += clipped
    n = nonzero[end] - nonzero[start]
    plogq = np.where(p_group > 0, p_group * np.log(np.maximum(q_group, 1e-300) / np.maximum(n, 1)), 0.0).sum(axis=1)
    kl_big = _kl_of(total, plogp[-1] - plogq - clipped * np.log(_KL_EPS), nonzero[-1] - nonzero[big], cum[big])

    return np.concatenate((small, big)), np.concatenate((kl_small, kl_big))


def _kl_of(total: float, numerator: np.ndarray, beyond: np.ndarray, inside: np.ndarray) -> np.ndarray:
    """KL(P || Q) per candidate from sum P log(P / Q_unnormalised) (``numerator``), the nonzero
    bins beyond the threshold (each holding _KL_EPS of Q) and the mass below the threshold."""
    kl = numerator / total + np.log((total + _KL_EPS * beyond) / total)
    return np.where(inside > 0, kl, np.inf)  # nothing below the threshold: not a candidate


def _mse_scale(
    counts: np.ndarray, edges: np.ndarray, lo: float, hi: float, data_min: float, data_max: float, num_bits: int
) -> float:
    """The a in _MSE_SCALES whose range (a*lo, a*hi) has the least expected squared error.

    Each bin's mass sits at its centre (clipped to the data's min/max, where no value lies beyond):
    inside the range it costs the rounding noise step**2 / 12, outside the squared clipping distance.
    """
    keep = counts > 0
    mass = counts[keep]
    x = np.clip((edges[:-1] + edges[1:])[keep] / 2, data_min, data_max)
    lo_a, hi_a = _MSE_SCALES[:, None] * lo, _MSE_SCALES[:, None] * hi
    step = (hi_a - lo_a) / (2**num_bits - 1)
    dist = np.maximum(lo_a - x, 0.0) + np.maximum(x - hi_a, 0.0)
    err = (mass * np.where(dist > 0, dist**2, step**2 / 12)).sum(axis=1)
    return float(_MSE_SCALES[np.argmin(err)])


# The file format of write_stats: 2 added per-channel min/max (TensorStats(channels=True)).
STATS_FORMAT = 2


def write_stats(path: str | os.PathLike, stats: dict[str, TensorStats]) -> None:
    """Save per-tensor statistics as JSON, atomically (a killed job never leaves half a file)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"format": STATS_FORMAT, "tensors": {key: s.to_dict() for key, s in stats.items()}}))
    os.replace(tmp, path)


def read_stats(path: str | os.PathLike, expected: set[str]) -> dict[str, TensorStats]:
    """Statistics saved by ``write_stats``; an error if they are not for exactly ``expected`` tensors
    or were written in another format (an older autoquant's cache: calibrate again)."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or data.get("format") != STATS_FORMAT:
        raise ConfigError(
            f"The calibration cache {path} was written in another statistics format than this autoquant's "
            f"({STATS_FORMAT}): delete it to recalibrate."
        )
    data = data.get("tensors")
    if not isinstance(data, dict) or set(data) != expected:
        raise ConfigError(
            f"The calibration cache {path} holds statistics for other tensors than this model's "
            f"({len(expected)} expected): delete it to recalibrate."
        )
    return {key: TensorStats.from_dict(d) for key, d in data.items()}
