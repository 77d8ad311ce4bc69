"""Latency of a candidate against the FP32 model, measured in one process, interleaved.

``measure_ratio`` repeats interleaved pairs until the ratio is known to a stated precision (or a
time cap is spent), and says how well it is known: the tuner, the probe and the experiments use it.

On a machine shared with other timing jobs, set ``AUTOQUANT_TIMING_LOCK`` to a file: each
measurement then holds an exclusive ``flock`` on it, so timings never overlap while the rest of a
run (calibration, evaluation) goes on unlocked. Do not also run the process under ``flock`` on the
same file: it would wait for itself.
"""

from __future__ import annotations

import fcntl
import math
import os
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from autoquant.errors import ConfigError

LOCK_VARIABLE = "AUTOQUANT_TIMING_LOCK"
WARMUP_PAIRS = 2  # untimed runs of each model first: allocators, lazily packed weights, caches


def pairs_to_decide(confidence: float) -> int:
    """The fewest pairs whose [min, max] holds the median with ``confidence`` (1 - 2 / 2^n): 6 for 95%."""
    return math.ceil(math.log2(2 / (1 - confidence)))


def _time(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@dataclass(frozen=True)
class LatencyRatio:
    """Candidate/baseline latency ratio: the median of per-pair ratios, with a distribution-free
    confidence interval [low, high] on that median (order statistics of the pairs)."""

    ratio: float
    low: float
    high: float
    confidence: float
    pairs: int
    baseline_ms: float
    candidate_ms: float

    def excludes(self, value: float) -> bool:
        """Whether ``value`` lies outside the interval (1.0: the candidate is known faster or slower).
        Never with fewer pairs than ``pairs_to_decide``: their widest interval, [min, max], holds
        the median less often than stated (3 pairs: 75%, so a null effect reads as a sign 1 time in 4)."""
        return self.pairs >= pairs_to_decide(self.confidence) and not self.low <= value <= self.high

    def apart_from(self, other: LatencyRatio) -> bool:
        """Whether this interval and ``other``'s do not overlap, each from enough pairs to decide
        (two models measured one after the other against the same baseline: which one is faster)."""
        enough = min(self.pairs, other.pairs) >= pairs_to_decide(self.confidence)
        return enough and (self.low > other.high or self.high < other.low)

    @property
    def half_width(self) -> float:
        """The interval's half-width relative to the ratio (0.05: known to about +-5%)."""
        return (self.high - self.low) / 2 / self.ratio

    def __str__(self) -> str:
        return (f"x{self.ratio:.3f} ({100 * self.confidence:g}% CI {self.low:.3f}-{self.high:.3f}, "
                f"{self.pairs} pairs)")


def measure_ratio(
    baseline: Callable[[], object],
    candidate: Callable[[], object],
    *,
    precision: float = 0.05,
    confidence: float = 0.95,
    budget_s: float = 10.0,
    min_pairs: int = 8,
    max_pairs: int = 2000,
    decide: float | None = None,
) -> LatencyRatio:
    """Time ``candidate`` against ``baseline`` in interleaved pairs (alternating which runs first)
    until the median ratio's confidence interval has a relative half-width of at most
    ``precision``, or excludes ``decide`` (if given: 1.0 asks only whether the candidate is faster
    or slower), or ``budget_s`` or ``max_pairs`` is spent, whichever comes first; check
    ``half_width`` and ``excludes`` to see which. One ratio per pair cancels the machine's slow drift (about +-20%
    between runs here), which a ratio of two medians does not."""
    if not (precision > 0 and 0 < confidence < 1 and min_pairs >= 2):
        raise ConfigError(f"measure_ratio needs precision > 0, 0 < confidence < 1 and min_pairs >= 2; got "
                          f"{precision=}, {confidence=}, {min_pairs=}.")
    with timing_lock():
        return _measure(baseline, candidate, precision, confidence, budget_s, min_pairs, max_pairs, decide)


@contextmanager
def timing_lock(path: str | None = None) -> Iterator[None]:
    """Holds an exclusive flock on ``path``, or else on the file ``AUTOQUANT_TIMING_LOCK`` names, if set."""
    path = path or os.environ.get(LOCK_VARIABLE)
    if not path:
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _measure(baseline: Callable[[], object], candidate: Callable[[], object], precision: float, confidence: float,
             budget_s: float, min_pairs: int, max_pairs: int, decide: float | None) -> LatencyRatio:
    for _ in range(WARMUP_PAIRS):
        baseline()
        candidate()
    z = statistics.NormalDist().inv_cdf(0.5 + confidence / 2)
    start = time.perf_counter()
    base: list[float] = []
    cand: list[float] = []
    ratios: list[float] = []
    while True:
        first, second = (baseline, candidate) if len(ratios) % 2 == 0 else (candidate, baseline)
        t1, t2 = _time(first), _time(second)
        b, c = (t1, t2) if first is baseline else (t2, t1)
        base.append(b)
        cand.append(c)
        ratios.append(c / max(b, 1e-12))
        if len(ratios) < min_pairs:
            continue
        result = _median_interval(ratios, z, confidence, base, cand)
        decided = decide is not None and result.excludes(decide)
        if (result.half_width <= precision or decided or time.perf_counter() - start > budget_s
                or len(ratios) >= max_pairs):
            return result


def _median_interval(ratios: list[float], z: float, confidence: float, base: list[float],
                     cand: list[float]) -> LatencyRatio:
    """The median of ``ratios`` and its order-statistic confidence interval (normal approximation
    of the binomial: ranks n/2 -+ z sqrt(n)/2)."""
    ordered = sorted(ratios)
    n = len(ordered)
    half = z * n**0.5 / 2
    low = ordered[max(0, int(n / 2 - half))]
    high = ordered[min(n - 1, int(n / 2 + half + 0.999999))]
    return LatencyRatio(statistics.median(ordered), low, high, confidence, n,
                        statistics.median(base) * 1e3, statistics.median(cand) * 1e3)
