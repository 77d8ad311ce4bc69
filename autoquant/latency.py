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
from collections.abc import Callable, Iterator, Sequence
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
    return measure_ratios(baseline, [candidate], precision=precision, confidence=confidence, budget_s=budget_s,
                          min_pairs=min_pairs, max_pairs=max_pairs, decide=decide)[0]


def measure_ratios(
    baseline: Callable[[], object],
    candidates: Sequence[Callable[[], object]],
    *,
    precision: float = 0.05,
    confidence: float = 0.95,
    budget_s: float = 10.0,
    min_pairs: int = 8,
    max_pairs: int = 2000,
    decide: float | None = None,
) -> list[LatencyRatio]:
    """``measure_ratio`` for several candidates at once, sharing the baseline's runs: each round
    runs the baseline and every candidate not yet known well enough, in an order that rotates from
    round to round, and pairs each candidate's run with the baseline's of the same round (k
    candidates cost k + 1 runs a round instead of 2k). ``budget_s`` is per candidate."""
    if not (precision > 0 and 0 < confidence < 1 and min_pairs >= 2):
        raise ConfigError(f"measure_ratio needs precision > 0, 0 < confidence < 1 and min_pairs >= 2; got "
                          f"{precision=}, {confidence=}, {min_pairs=}.")
    if not candidates:
        return []
    with timing_lock():
        return _measure(baseline, list(candidates), precision, confidence, budget_s * len(candidates), min_pairs,
                        max_pairs, decide)


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


def _measure(baseline: Callable[[], object], candidates: list[Callable[[], object]], precision: float,
             confidence: float, budget_s: float, min_pairs: int, max_pairs: int,
             decide: float | None) -> list[LatencyRatio]:
    models = [baseline, *candidates]
    for _ in range(WARMUP_PAIRS):
        for model in models:
            model()
    z = statistics.NormalDist().inv_cdf(0.5 + confidence / 2)
    start = time.perf_counter()
    base: list[list[float]] = [[] for _ in candidates]
    cand: list[list[float]] = [[] for _ in candidates]
    ratios: list[list[float]] = [[] for _ in candidates]
    results: dict[int, LatencyRatio] = {}
    rounds = 0
    while len(results) < len(candidates):
        active = [i for i in range(len(candidates)) if i not in results]
        order = [-1, *active]  # -1: the baseline
        shift = rounds % len(order)
        times = {i: _time(baseline if i < 0 else candidates[i]) for i in order[shift:] + order[:shift]}
        rounds += 1
        over = time.perf_counter() - start > budget_s
        for i in active:
            base[i].append(times[-1])
            cand[i].append(times[i])
            ratios[i].append(times[i] / max(times[-1], 1e-12))
            if len(ratios[i]) < min_pairs:
                continue
            result = _median_interval(ratios[i], z, confidence, base[i], cand[i])
            decided = decide is not None and result.excludes(decide)
            if result.half_width <= precision or decided or over or len(ratios[i]) >= max_pairs:
                results[i] = result
    return [results[i] for i in range(len(candidates))]


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
