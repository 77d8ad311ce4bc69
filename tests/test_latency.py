"""measure_ratio: interleaved pairs until the median ratio is known to a stated precision."""

from __future__ import annotations

import time

import pytest

import autoquant.latency
import autoquant.tuner
from autoquant.errors import ConfigError
from autoquant.latency import WARMUP_PAIRS, LatencyRatio, measure_ratio, measure_ratios


def sleeper(seconds: float):
    return lambda: time.sleep(seconds)


def test_ratio_converges_to_the_stated_precision():
    result = measure_ratio(sleeper(0.001), sleeper(0.002), precision=0.05, budget_s=20)
    assert result.half_width <= 0.05
    assert result.low <= result.ratio <= result.high
    assert 1.6 < result.ratio < 2.4
    assert result.pairs >= 8 and "CI" in str(result)


def test_time_budget_bounds_an_imprecise_measurement():
    start = time.perf_counter()
    result = measure_ratio(sleeper(0.001), sleeper(0.001), precision=1e-6, budget_s=0.3)
    assert time.perf_counter() - start < 1.5
    assert result.half_width > 1e-6  # not reached, and the result says so


def test_decide_stops_once_faster_or_slower_is_known():
    # +-5% would take many pairs at 1 ms vs 1.5 ms; "slower than the baseline" is known after a few
    result = measure_ratio(sleeper(0.001), sleeper(0.0015), precision=1e-6, budget_s=20, min_pairs=3, decide=1.0)
    assert result.excludes(1.0) and result.low > 1.0
    assert 6 <= result.pairs < 20  # not before 6 pairs: fewer cannot tell at 95%
    without = measure_ratio(sleeper(0.001), sleeper(0.0015), precision=1e-6, budget_s=0.2, min_pairs=3)
    assert without.pairs > 40  # without decide: measured until the budget ran out


def test_candidates_measured_together_share_the_baselines_runs():
    calls = {"baseline": 0, "fast": 0, "slow": 0}

    def counted(name: str, seconds: float):
        def run() -> None:
            calls[name] += 1
            time.sleep(seconds)
        return run

    fast, slow = measure_ratios(counted("baseline", 0.002), [counted("fast", 0.001), counted("slow", 0.004)],
                                precision=1e-6, budget_s=20, min_pairs=3, decide=1.0)
    assert fast.high < 1.0 and 0.35 < fast.ratio < 0.65
    assert slow.low > 1.0 and 1.6 < slow.ratio < 2.4
    # one baseline run a round for both candidates (two separate measurements: one per candidate and round)
    assert calls["baseline"] == WARMUP_PAIRS + max(fast.pairs, slow.pairs)
    assert calls["fast"] == WARMUP_PAIRS + fast.pairs and calls["slow"] == WARMUP_PAIRS + slow.pairs
    assert measure_ratios(counted("baseline", 0.0), []) == []


def test_too_few_pairs_tell_nothing():
    from autoquant.latency import LatencyRatio, pairs_to_decide

    assert pairs_to_decide(0.95) == 6  # [min, max] of 6 pairs holds the median 1 - 2/64 of the time
    three = LatencyRatio(1.1, 1.05, 1.15, 0.95, 3, 1.0, 1.1)  # all 3 pairs slower: 1 chance in 8 with no effect
    assert not three.excludes(1.0)
    assert LatencyRatio(1.1, 1.05, 1.15, 0.95, 6, 1.0, 1.1).excludes(1.0)
    # two models against one baseline: apart only where both intervals, from enough pairs, do not overlap
    fast, slow = LatencyRatio(0.5, 0.48, 0.52, 0.95, 6, 1.0, 0.5), LatencyRatio(0.6, 0.55, 0.65, 0.95, 6, 1.0, 0.6)
    assert fast.apart_from(slow) and slow.apart_from(fast)
    assert not fast.apart_from(LatencyRatio(0.55, 0.51, 0.6, 0.95, 6, 1.0, 0.55))  # overlapping
    assert not fast.apart_from(LatencyRatio(0.6, 0.55, 0.65, 0.95, 3, 1.0, 0.6))  # 3 pairs


def test_bad_arguments_are_config_errors():
    with pytest.raises(ConfigError, match="precision > 0"):
        measure_ratio(sleeper(0), sleeper(0), precision=0)


def test_fixed_budget_measurement_is_gone():
    # one way to time candidates: every caller moved to measure_ratio (issue 14)
    assert not hasattr(autoquant.latency, "measure_latency")


def test_measure_ratio_waits_for_the_timing_lock(tmp_path, monkeypatch):
    import fcntl
    import threading

    from autoquant.latency import LOCK_VARIABLE

    lock = tmp_path / "timing.lock"
    monkeypatch.setenv(LOCK_VARIABLE, str(lock))
    done = threading.Event()
    with open(lock, "a") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)  # another job is timing
        thread = threading.Thread(target=lambda: (measure_ratio(lambda: None, lambda: None, budget_s=0.01),
                                                  done.set()))
        thread.start()
        assert not done.wait(0.3)  # waits while the lock is held
        fcntl.flock(holder, fcntl.LOCK_UN)
    thread.join(5)
    assert done.is_set()


def test_the_tuner_measures_longer_while_faster_or_slower_than_fp32_is_undecided(monkeypatch):
    """A pass measured at x0.99 +-20% would end the search as "faster than FP32": the tuner measures
    it again, up to 4 times as long, until it can tell (here: slower, so the search goes on)."""
    from autoquant import AccuracyCriterion, Tuner
    from autoquant.latency import LatencyRatio
    from tests.fake_adapter import FakeAdapter, fake_model

    calls: list[tuple[float, float | None]] = []
    real = autoquant.tuner.measure_ratio

    def measure(baseline, candidate, **kwargs):
        calls.append((kwargs["budget_s"], kwargs.get("decide")))
        real(baseline, candidate, **kwargs)  # the backend runs
        if len(calls) % 2:  # each candidate's first measurement cannot tell
            return LatencyRatio(0.99, 0.8, 1.2, 0.95, 5, 1.0, 0.99)
        return LatencyRatio(1.1, 1.05, 1.15, 0.95, 40, 1.0, 1.1)

    monkeypatch.setattr(autoquant.tuner, "measure_ratio", measure)
    result = Tuner(AccuracyCriterion(relative=0.5), strategy="random", max_trials=2, seed=0,
                   latency_budget_s=0.01).tune(fake_model(n_ops=3), [None], lambda m: m.accuracy(), adapter=FakeAdapter)
    assert calls[:2] == [(0.01, None), (0.04, 1.0)]
    assert result.trials == 2 and result.slower_than_fp32 and result.latency_ratio == pytest.approx(1.1)


def test_a_candidate_is_timed_before_eval_fn_runs_it():
    """A oneDNN INT8 conv keeps one primitive, for the input shape it first ran with: timed after
    eval_fn's batches, it would be timed on its slow path (x1.25 on a depthwise CNN)."""
    from autoquant.evaluation import evaluate_candidate

    order = []

    def eval_fn(model):
        order.append("eval_fn")
        return 1.0

    def latency(model):
        order.append("latency")
        return LatencyRatio(0.5, 0.49, 0.51, 0.95, 10, 1.0, 0.5)

    scored = evaluate_candidate(lambda: "model", eval_fn, latency, "a candidate")
    assert order == ["latency", "eval_fn"] and scored.accuracy == 1.0 and scored.latency.ratio == 0.5
