import pytest

from autoquant import AccuracyCriterion, ConfigError

HIGHER, LOWER = True, False


@pytest.mark.parametrize(
    "kind, tolerance, higher, baseline, value, loss, passes",
    [
        # relative, higher is better (accuracy)
        ("relative", 0.01, HIGHER, 0.90, 0.891, 0.01, True),
        ("relative", 0.01, HIGHER, 0.90, 0.8909, 0.0101111, False),
        ("relative", 0.01, HIGHER, 0.90, 0.95, -0.0555556, True),
        # relative with a negative metric (e.g. a negative log-likelihood score): the drop is over |baseline|
        ("relative", 0.10, HIGHER, -2.0, -2.1, 0.05, True),
        ("relative", 0.10, HIGHER, -2.0, -2.3, 0.15, False),
        # relative, lower is better (a loss, WER): a rise is a loss
        ("relative", 0.05, LOWER, 0.20, 0.21, 0.05, True),
        ("relative", 0.05, LOWER, 0.20, 0.22, 0.10, False),
        ("relative", 0.05, LOWER, 0.20, 0.10, -0.5, True),
        ("relative", 0.05, LOWER, -4.0, -3.9, 0.025, True),
        # absolute
        ("absolute", 0.005, HIGHER, 0.80, 0.7951, 0.0049, True),
        ("absolute", 0.005, HIGHER, 0.80, 0.7949, 0.0051, False),
        ("absolute", 0.5, LOWER, 10.0, 10.6, 0.6, False),
        ("absolute", 0.5, LOWER, 0.0, 0.4, 0.4, True),
        ("absolute", 0.0, HIGHER, 0.5, 0.5, 0.0, True),
        ("absolute", 0.0, HIGHER, 0.5, 0.4999, 0.0001, False),
    ],
)
def test_loss_and_passes(kind, tolerance, higher, baseline, value, loss, passes):
    criterion = AccuracyCriterion(**{kind: tolerance}, higher_is_better=higher)
    assert criterion.loss(baseline, value) == pytest.approx(loss, rel=1e-5, abs=1e-12)
    assert criterion.passes(baseline, value) is passes


def test_tolerance_boundary_passes_despite_rounding():
    # 0.9 * 0.99 is not exactly 0.891 in binary floating point.
    assert AccuracyCriterion(relative=0.01).passes(0.9, 0.9 * 0.99)


def test_relative_with_zero_baseline_is_an_error():
    with pytest.raises(ConfigError, match="absolute="):
        AccuracyCriterion(relative=0.01).passes(0.0, 0.1)


@pytest.mark.parametrize("kwargs", [{}, {"relative": 0.1, "absolute": 0.1}, {"relative": -0.01},
                                    {"absolute": float("nan")}])
def test_invalid_criteria(kwargs):
    with pytest.raises(ConfigError):
        AccuracyCriterion(**kwargs)


def test_describe_says_kind_and_direction():
    assert AccuracyCriterion(relative=0.01).describe() == "lose at most 0.01 relative (higher is better)"
    assert "lower is better" in AccuracyCriterion(absolute=0.2, higher_is_better=False).describe()


def test_a_percent_typed_as_a_fraction_is_refused_with_the_hint():
    with pytest.raises(ConfigError, match=r"write 0.015 for 1.5%.*allow_large_relative=True"):
        AccuracyCriterion(relative=1.5)
    with pytest.raises(ConfigError, match="write 0.01 for 1%"):
        AccuracyCriterion(relative=1.0)
    # meant: an explicit override; and a lower-is-better metric may well double
    assert AccuracyCriterion(relative=1.5, allow_large_relative=True).passes(1.0, -0.4)
    assert AccuracyCriterion(relative=1.5, higher_is_better=False).passes(0.2, 0.49)
    assert AccuracyCriterion(relative=0.99).tolerance == 0.99


# --- a goal finer than the metric's step -------------------------------------------------------------
def test_metric_step_is_found_from_accuracies_over_a_test_set():
    import numpy as np

    from autoquant.criterion import metric_step

    counts = np.float32([585, 583, 584]) / np.float32(597)  # float32, as a torch accuracy is
    assert metric_step(counts, below=0.001) == pytest.approx(1 / 597)
    assert metric_step(counts, below=1 / 590) is None  # the goal allows more than one step: no concern
    assert metric_step(counts[:1], below=0.001) is None  # one value fits every grid


def test_metric_step_refuses_values_that_fit_a_grid_by_chance():
    import numpy as np

    from autoquant.criterion import metric_step

    rng = np.random.default_rng(0)
    found = [metric_step(rng.random(k), below=below) for k in (2, 3, 5) for below in (1e-2, 1e-3, 1e-4)
             for _ in range(200)]
    assert sum(step is not None for step in found) <= 2  # at most 1e-3 each by design


def test_step_advice_names_the_step_and_the_least_goal_that_means_something():
    from autoquant.criterion import step_advice

    text = step_advice(AccuracyCriterion(relative=0.001), 585 / 597, 1 / 597)
    assert "1/597" in text and "loses no sample" in text
    assert "relative=0.0018" in text  # one step over the baseline, 0.00171, rounded up
