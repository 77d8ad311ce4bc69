"""End to end on the shipped example: a real tune of the digits CNN on PyTorch's INT8 kernels."""

import copy

import pytest
import torch

import autoquant
from autoquant import AccuracyCriterion, Tuner
from autoquant.examples.digits import accuracy_fn, load_data, make_fragile, train_model


@pytest.fixture(scope="module")
def digits():
    data = load_data()
    return data, train_model(data, epochs=3), accuracy_fn(data)


class CountingLoader:
    """A calibration loader that counts how many batches it hands out."""

    def __init__(self, batches):
        self.batches, self.served = batches, 0

    def __iter__(self):
        for batch in self.batches:
            self.served += 1
            yield batch


def test_tune_meets_one_percent_and_is_faster(digits, tmp_path):
    data, model, eval_fn = digits
    loader = CountingLoader(data.calibration_batches())
    result = Tuner(AccuracyCriterion(relative=0.01), strategy="bayesian", max_trials=10).tune(model, loader, eval_fn)

    assert result.met and result.relative_loss <= 0.01
    assert result.latency_ratio < 1.0
    assert result.accuracy == eval_fn(result.model)
    assert result.baseline_accuracy == eval_fn(model)
    assert any(type(m).__module__.startswith("torch.ao.nn.quantized") for m in result.model.modules())
    assert len(result.history) == result.trials
    # the first batch for tracing, one pass for the data's fingerprint (tying the study to it), then
    # one calibration pass: no candidate re-reads the data
    assert loader.served == 1 + 2 * len(loader.batches)

    result.save(tmp_path)
    assert eval_fn(autoquant.load(tmp_path)) == result.accuracy
    assert autoquant.load_config(tmp_path) == result.config


def test_unmeetable_goal_returns_the_best_candidate(digits):
    data, model, eval_fn = digits

    def pessimist(candidate):  # every candidate scores 5 points below FP32: the goal can never be met
        score = eval_fn(candidate)
        return score if candidate is model else score - 0.05

    result = Tuner(AccuracyCriterion(relative=0.001), strategy="random", max_trials=4).tune(
        model, data.calibration_batches(), pessimist)
    assert not result.met and result.trials == 4 and result.evaluations == 4
    assert result.accuracy == pytest.approx(result.history["accuracy"].max())
    assert isinstance(result.model, torch.nn.Module)


@pytest.mark.parametrize("strategy", ["exhaustive", "random", "bayesian"])
def test_search_rescues_a_model_naive_int8_breaks(digits, strategy):
    data, model, eval_fn = digits
    fragile = make_fragile(copy.deepcopy(model), data.train[0][:512])
    assert eval_fn(fragile) == eval_fn(model)  # same function in FP32
    result = Tuner(AccuracyCriterion(relative=0.01), strategy=strategy, max_trials=30).tune(
        fragile, data.calibration_batches(), eval_fn)
    first = result.history.iloc[0]
    assert first["calibration"] == "minmax" and first["n_fp32"] == 0
    assert first["loss"] > 0.05  # the default candidate loses badly
    assert result.met and result.trials > 1 and result.latency_ratio < 1.0
