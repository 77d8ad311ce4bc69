"""Tests of autoquant.calibration: streaming statistics and the four range methods."""

from __future__ import annotations

import io
import json
import time

import numpy as np
import pytest

from autoquant.calibration import METHODS, CalibrationMethod, TensorStats, _kl_divergences, compute_range

RNG_SEED = 0


def stats_of(*batches, num_bins: int = 2048) -> TensorStats:
    stats = TensorStats(num_bins)
    for batch in batches:
        stats.update(batch)
    return stats


@pytest.fixture(scope="module")
def outliers() -> TensorStats:
    """100000 N(0, 1) samples plus 5 values of 1000."""
    rng = np.random.default_rng(RNG_SEED)
    return stats_of(np.concatenate([rng.standard_normal(100_000), np.full(5, 1000.0)]))


@pytest.fixture(scope="module")
def uniform() -> TensorStats:
    return stats_of(*np.random.default_rng(RNG_SEED).uniform(-1, 1, (4, 50_000)))


@pytest.fixture(scope="module")
def relu() -> TensorStats:
    """One-sided, post-ReLU-like data: |N(0, 1)| plus 5 values of 1000, in batches."""
    rng = np.random.default_rng(RNG_SEED)
    return stats_of(np.abs(rng.standard_normal((50, 40))), np.abs(rng.standard_normal(98_000)), np.full(5, 1000.0))


# --- TensorStats -------------------------------------------------------------------------------


def test_min_max_count_are_exact_over_batches_of_any_shape_and_dtype():
    rng = np.random.default_rng(RNG_SEED)
    batches = [
        rng.normal(0, 1, (3, 4)).astype(np.float32),
        rng.normal(0, 5, 7),
        rng.normal(2, 1, (2, 3, 2)).astype(np.float16),
        [[-3, 8]],  # ints, a nested list
    ]
    stats = stats_of(*batches)
    values = np.concatenate([np.asarray(b, dtype=np.float64).ravel() for b in batches])
    assert (stats.min, stats.max, stats.count, stats.nonfinite) == (values.min(), values.max(), 33, 0)
    assert stats.histogram[0].sum() == 33


def test_nonfinite_values_are_ignored_and_counted():
    nan, inf = np.nan, np.inf
    stats = stats_of([nan, inf, -inf], [0.5, -inf, 2.0], np.full((2, 2), nan), [inf, -1.5, nan])
    assert (stats.min, stats.max, stats.count, stats.nonfinite) == (-1.5, 2.0, 3, 10)
    counts, edges = stats.histogram
    assert counts.sum() == 3 and np.isfinite(counts).all()
    assert edges[-1] == 2.0  # the all-non-finite first batch did not set the range


@pytest.mark.parametrize(
    "first_max, second_max",
    [
        (1.0, 3.5),  # R: 1 -> 4 by 2 doublings; power-of-two edges, every step exact
        (0.7, 5.0),  # R: 0.7 -> 5.6 by 3 doublings
        (1e-3, 40.0),  # 16 doublings: the first batch collapses into the two middle bins
    ],
)
def test_range_doubling_rebins_exactly(first_max, second_max):
    rng = np.random.default_rng(RNG_SEED)
    a = np.append(rng.uniform(-first_max, first_max, 20_000), first_max)  # includes +R: the edge case
    b = np.append(rng.uniform(-second_max, second_max, 20_000), -second_max)
    stats = stats_of(a, b, num_bins=256)
    counts, edges = stats.histogram
    assert stats.min == -second_max and edges[-1] >= second_max
    # Binned in two passes with a merge, yet equal bin for bin to one pass at the final edges.
    np.testing.assert_array_equal(counts, np.histogram(np.concatenate([a, b]), edges)[0])


@pytest.mark.parametrize("num_bins", [200, 2048])
def test_values_at_plus_minus_range_land_in_the_end_bins(num_bins):
    r = 5.953050386113303  # with 100 bins a side, r * (100 / r) rounds above 100
    counts, edges = stats_of([-r, 0.0, r], [r / 3], num_bins=num_bins).histogram
    assert edges[0] == -edges[-1] == pytest.approx(-r, rel=1e-15)
    assert (counts[0], counts[num_bins // 2], counts[-1], counts.sum()) == (1, 1, 1, 4)


def test_memory_stays_bounded_over_many_widening_batches():
    rng = np.random.default_rng(RNG_SEED)
    stats = TensorStats(num_bins=64)
    for i in range(200):
        stats.update(rng.standard_normal(100) * 1.5**i)
    counts, edges = stats.histogram
    assert counts.shape == (64,) and edges.shape == (65,)
    assert len(stats.to_dict()["counts"]) == 65  # 64 bins + the slot for values exactly at +R
    assert counts.sum() == stats.count == 20_000


@pytest.mark.parametrize("via", ["json", "npz"])
def test_to_dict_from_dict_round_trip(outliers, via):
    if via == "json":
        restored = TensorStats.from_dict(json.loads(json.dumps(outliers.to_dict())))
    else:
        buffer = io.BytesIO()
        np.savez(buffer, **outliers.to_dict())
        buffer.seek(0)
        restored = TensorStats.from_dict(dict(np.load(buffer)))
    assert (restored.min, restored.max, restored.count, restored.nonfinite) == (
        outliers.min, outliers.max, outliers.count, outliers.nonfinite
    )
    for got, want in zip(restored.histogram, outliers.histogram, strict=False):
        np.testing.assert_array_equal(got, want)
    for method in ("minmax", "entropy", "percentile-99.99", "mse"):
        assert compute_range(restored, method) == compute_range(outliers, method)
    restored.update([-5000.0])  # still usable: a widening batch after the restore
    assert restored.histogram[0].sum() == outliers.count + 1


@pytest.mark.parametrize("num_bins", [0, 7, 2.5, True])
def test_num_bins_must_be_an_even_integer(num_bins):
    with pytest.raises(ValueError, match="even integer"):
        TensorStats(num_bins)


# --- compute_range: invariants and hand cases --------------------------------------------------


@pytest.mark.parametrize(
    "data, symmetric, expected",
    [
        ([0, 1, 2, 3], False, (0.0, 3.0)),
        ([-2, 1], True, (-2.0, 2.0)),
        ([-2, 1], False, (-2.0, 1.0)),
        ([2.0, 5.0], False, (0.0, 5.0)),  # all positive: 0 is included
        ([-4.0, -1.0], False, (-4.0, 0.0)),  # all negative: 0 is included
        ([-1.0, 3.0], True, (-3.0, 3.0)),
        ([0.0, 0.0], False, (0.0, 0.0)),
    ],
)
def test_minmax_hand_cases(data, symmetric, expected):
    assert compute_range(stats_of(data), "minmax", symmetric=symmetric) == expected


@pytest.mark.parametrize("method", ["minmax", "entropy", "percentile-99.99", "percentile-60", "mse"])
@pytest.mark.parametrize("data", ["outliers", "uniform", "relu"])
def test_range_includes_zero_and_never_exceeds_the_data(method, data, request):
    stats = request.getfixturevalue(data)
    lo, hi = compute_range(stats, method)
    assert min(stats.min, 0.0) <= lo <= 0.0 <= hi <= max(stats.max, 0.0)
    lo, hi = compute_range(stats, method, symmetric=True)
    assert lo == -hi and 0.0 <= hi <= max(-stats.min, stats.max)


def test_constant_data_keeps_its_value_for_every_method():
    stats = stats_of(np.full(1000, 5.0))
    for method in ("minmax", "entropy", "percentile-99.99", "mse"):
        assert compute_range(stats, method) == (0.0, 5.0), method
        # Symmetric ranges are not clipped to the data's min, so a quantile may fall just short.
        assert compute_range(stats, method, symmetric=True) == pytest.approx((-5.0, 5.0), rel=1e-6), method


def test_percentile_on_uniform_data():
    stats = stats_of(np.random.default_rng(RNG_SEED).uniform(0, 1, 1_000_000))
    width = np.diff(stats.histogram[1])[0]
    lo, hi = compute_range(stats, "percentile-99")
    assert lo == 0.0 and abs(hi - 0.99) < width
    assert abs(compute_range(stats, "percentile-90", symmetric=True)[1] - 0.9) < width


def test_percentile_clips_outliers(outliers):
    assert compute_range(outliers, "minmax")[1] == 1000.0
    lo, hi = compute_range(outliers, "percentile-99.99")
    assert -10 < lo < -2 and 2 < hi < 10
    assert 2 < compute_range(outliers, "percentile-99.99", symmetric=True)[1] < 10


def test_entropy_clips_outliers(outliers):
    lo, hi = compute_range(outliers, "entropy")
    assert -50 < lo < -2 and 2 < hi < 50
    assert 2 < compute_range(outliers, "entropy", symmetric=True)[1] < 50


def test_entropy_keeps_most_of_a_range_without_outliers(uniform):
    lo, hi = compute_range(uniform, "entropy")
    assert lo < -0.8 and hi > 0.8


def test_entropy_on_one_sided_data(relu):
    lo, hi = compute_range(relu, "entropy")
    assert lo == 0.0 and 2 < hi < 50


def _reference_kl(f: np.ndarray, nq: int, i: int, eps: float = 1e-4) -> float:
    """KL(P||Q) of threshold index i, bin by bin: P the whole histogram; Q as in TensorRT / MXNet
    inside the threshold, plus the clipped mass on the top level, and eps beyond it."""
    if i < nq:  # [0, i] drawn as nq bins of uniform density, the bins beyond as they are
        cdf = np.interp(i * np.arange(nq + 1) / nq, np.arange(f.size + 1), np.append(0, np.cumsum(f)))
        f, i = np.append(np.diff(cdf), f[i:]), nq
    p = f.copy()
    q = np.zeros(f.size)
    m = i // nq
    for j in range(nq):
        lo, hi = j * m, (i if j == nq - 1 else (j + 1) * m)
        nonzero = p[lo:hi] > 0
        mass = f[lo:hi].sum() + (f[i:].sum() if j == nq - 1 else 0.0)
        if nonzero.any():
            q[lo:hi][nonzero] = mass / nonzero.sum()
        else:
            q[hi - 1] = mass  # where P = 0: counts only in Q's total
    q[i:][p[i:] > 0] = eps
    p, q = p / p.sum(), q / q.sum()
    return float(np.sum(p[p > 0] * np.log(p[p > 0] / q[p > 0])))


def test_vectorised_kl_matches_a_bin_by_bin_reference():
    rng = np.random.default_rng(RNG_SEED)
    f = np.bincount(np.abs(rng.normal(0, 100, 20_000)).astype(int).clip(0, 299), minlength=300).astype(float)
    f[[140, 280]] = 0  # empty bins inside groups and at candidate ends
    f[150:170] = 0  # candidate 170: its whole last group empty, clipped mass > 0
    f[290:299] = 0  # a gap before the clipped tail in the last bin
    candidates, kl = _kl_divergences(f, 16)
    assert candidates.tolist() == list(range(1, 301))
    for i in (1, 2, 15, 16, 17, 40, 141, 152, 170, 200, 281, 295, 300):
        assert kl[i - 1] == pytest.approx(_reference_kl(f, 16, i), rel=1e-9, abs=1e-12), i


def test_mse_clips_outliers_and_keeps_uniform_ranges(outliers, uniform):
    assert compute_range(outliers, "mse")[1] < compute_range(outliers, "minmax")[1]
    lo, hi = compute_range(uniform, "mse")
    assert lo <= 0.9 * uniform.min and hi >= 0.9 * uniform.max
    lo, hi = compute_range(uniform, "mse", symmetric=True)
    assert lo == -hi and hi >= 0.9 * max(-uniform.min, uniform.max)


def test_mse_clips_a_wide_tail_more_with_fewer_bits():
    # Laplace data: the optimal clip shrinks as the rounding step (2**num_bits levels) grows.
    stats = stats_of(np.random.default_rng(RNG_SEED).laplace(size=200_000))
    his = [compute_range(stats, "mse", num_bits=bits)[1] for bits in (4, 8)]
    assert his[0] < his[1] < stats.max


# --- CalibrationMethod -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, name, percentile",
    [
        ("minmax", "minmax", None),
        ("entropy", "entropy", None),
        ("mse", "mse", None),
        ("percentile-99.99", "percentile", 99.99),
        ("percentile-99.999", "percentile", 99.999),
        ("percentile-100", "percentile", 100.0),
    ],
)
def test_parse_round_trips(text, name, percentile):
    method = CalibrationMethod.parse(text)
    assert (method.name, method.percentile) == (name, percentile)
    assert str(method) == text
    assert CalibrationMethod.parse(method) is method
    assert method.name in METHODS


@pytest.mark.parametrize(
    "text, message",
    [
        ("percentile", "needs a value, e.g. 'percentile-99.99'"),
        ("percentile-101", r"must be in \(50, 100\], got 101"),
        ("percentile-50", r"must be in \(50, 100\]"),
        ("percentile-abc", "'abc' is not a number"),
        ("kl", "valid forms: 'minmax', 'entropy', 'mse', or 'percentile-<p>'.*Did you mean 'entropy'"),
        ("entropi", "Unknown calibration method 'entropi'.*Did you mean 'entropy'"),
        ("minmax-3", "'minmax' takes no parameter"),
    ],
)
def test_parse_rejects_bad_text_helpfully(text, message):
    with pytest.raises(ValueError, match=message):
        CalibrationMethod.parse(text)


def test_percentile_is_required_for_percentile_only():
    with pytest.raises(ValueError, match="takes no percentile"):
        CalibrationMethod("minmax", 99.0)
    with pytest.raises(ValueError, match="needs a value"):
        CalibrationMethod("percentile")


# --- errors and speed --------------------------------------------------------------------------


@pytest.mark.parametrize("batches", [[], [[np.nan, np.inf]], [np.zeros((0, 3))]])
def test_compute_range_without_finite_values_raises(batches):
    with pytest.raises(ValueError, match="no finite values were observed"):
        compute_range(stats_of(*batches), "minmax")


@pytest.mark.parametrize("num_bits", [1, 17, 8.0])
def test_compute_range_rejects_bad_num_bits(uniform, num_bits):
    with pytest.raises(ValueError, match="num_bits"):
        compute_range(uniform, "minmax", num_bits=num_bits)


@pytest.mark.parametrize("method", ["entropy", "mse"])
def test_histogram_methods_are_vectorised(outliers, method):
    compute_range(outliers, method)  # warm-up
    start = time.perf_counter()
    compute_range(outliers, method)
    assert time.perf_counter() - start < 0.2


# --- entropy that cannot collapse (issue 14) -----------------------------------------------------
def _collapsing() -> dict[str, np.ndarray]:
    """Distributions on which TensorRT's KL threshold (P clipped, 128 levels, 2048 bins) clipped
    most of the tensor: a near-constant tensor (99.9995% clipped) and a sparse one, mostly zeros
    with few distinct values, like a random-init MobileNetV2's pooled features (0.67% clipped)."""
    rng = np.random.default_rng(RNG_SEED)
    levels = np.sort(rng.lognormal(-2, 0.8, 300))
    return {
        "near_constant": 5.9 + 0.01 * rng.standard_normal(200_000),
        "sparse_few_values": np.where(rng.random(200_000) < 0.6, 0.0, rng.choice(levels, 200_000)),
        "relu6_saturated": np.clip(rng.normal(2, 3, 200_000), 0, 6),  # 9% exactly at 6
    }


@pytest.mark.parametrize("name", ["near_constant", "sparse_few_values", "relu6_saturated"])
@pytest.mark.parametrize("symmetric", [False, True])
def test_entropy_never_clips_a_mode(name, symmetric):
    x = _collapsing()[name]
    lo, hi = compute_range(stats_of(x), "entropy", symmetric=symmetric)
    assert ((x < lo) | (x > hi)).mean() <= 1e-4
    assert hi >= 0.99 * np.quantile(x, 0.9999)


def test_entropy_uses_every_level_of_a_one_sided_asymmetric_tensor():
    """uint8 over [0, t] has 256 levels, not 128: judged on 128 the KL over-rates clipping."""
    from autoquant.calibration import _entropy_threshold, _fold

    stats = stats_of(np.abs(np.random.default_rng(RNG_SEED).standard_normal(200_000)))
    f = _fold(stats.histogram[0])
    width = stats.histogram[1][1] - stats.histogram[1][0]
    assert compute_range(stats, "entropy")[1] == pytest.approx(_entropy_threshold(f, 256) * width)
    assert _entropy_threshold(f, 256) != _entropy_threshold(f, 128)


def test_clipped_fraction_and_overclipping_flag_a_method_that_clips_far_more():
    from autoquant.calibration import clipped_fraction, overclipping

    x = np.random.default_rng(RNG_SEED).uniform(0, 1, 100_000)
    stats = {"t": stats_of(x)}
    assert clipped_fraction(stats["t"], 0.0, 0.5) == pytest.approx(0.5, abs=0.01)
    assert clipped_fraction(stats["t"], 0.0, 1.0) == 0.0
    assert overclipping(stats, ["minmax", "entropy", "mse"]) == {}
    fake = {("t", "minmax"): (0.0, 1.0), ("t", "entropy"): (0.0, 0.5), ("t", "mse"): (0.0, 0.999)}
    assert overclipping(stats, ["minmax", "entropy", "mse"], ranges=lambda t, m: fake[t, m]) == {"entropy": ["t"]}
