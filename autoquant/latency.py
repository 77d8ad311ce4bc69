"""Latency of a candidate against the FP32 model, measured in one process, interleaved."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Latency:
    baseline_ms: float
    candidate_ms: float
    repeats: int

    @property
    def ratio(self) -> float:
        return self.candidate_ms / self.baseline_ms


def measure_latency(
    baseline: Callable[[], object],
    candidate: Callable[[], object],
    *,
    budget_s: float = 0.25,
    min_repeats: int = 5,
    max_repeats: int = 200,
) -> Latency:
    """Median latency of two zero-argument callables, run alternately.

    Alternating (and swapping which goes first) spreads the machine's drift, which is about +-20%
    between runs here, over both; the number of repeats fits the time budget.
    """
    for _ in range(2):  # warm-up: allocators, lazily packed weights, caches
        baseline()
        candidate()
    one = _time(baseline) + _time(candidate)
    repeats = max(min_repeats, min(max_repeats, int(budget_s / max(one, 1e-9))))
    base_times: list[float] = []
    cand_times: list[float] = []
    for i in range(repeats):
        pair = ((baseline, base_times), (candidate, cand_times))
        for fn, times in pair if i % 2 == 0 else reversed(pair):
            times.append(_time(fn))
    return Latency(statistics.median(base_times) * 1e3, statistics.median(cand_times) * 1e3, repeats)


def _time(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start
