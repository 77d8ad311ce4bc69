"""What a finished job says (issues 11 and 14): whole-model op counts, a pass slower than FP32 that
does not stop the search, and latency known to a stated precision.

The model is a real FX model whose INT8 kernels lose to FP32: three 8-wide Linear layers (quantize,
INT8 kernel and dequantize cost more than a tiny FP32 matmul) after an Embedding, which has no INT8
kernel. Where a test needs a deterministic latency it replaces the measurement at the tuner's seam
(``latency_fn``); the backend always runs for real.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from rich.console import Console
from torch import nn

from autoquant import AccuracyCriterion, Restriction, Tuner
from autoquant.report import summary_table
from tests.fake_adapter import fixed_latency


class TinyLinears(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.fc1, self.fc2, self.head = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids).mean(1)
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


@pytest.fixture(scope="module")
def case():
    torch.manual_seed(0)
    model = TinyLinears().eval()
    calib = [torch.randint(0, 10, (4, 5)) for _ in range(2)]
    with torch.no_grad():
        reference = model(calib[0])

    def agreement(candidate) -> float:  # top-1 agreement with FP32: 1.0 for the FP32 model
        with torch.no_grad():
            return float((candidate(calib[0]).argmax(1) == reference.argmax(1)).float().mean())

    return model, calib, agreement


EVERYTHING_PASSES = AccuracyCriterion(absolute=1.0)


def test_counts_cover_the_whole_model(case, tmp_path, caplog):
    model, calib, agreement = case
    caplog.set_level(logging.INFO, logger="autoquant")
    result = Tuner(EVERYTHING_PASSES, strategy="random", max_trials=1, restrict=Restriction(fp32_ops=["fc2"]),
                   latency_fn=fixed_latency(lambda c: 0.5)).tune(model, calib, agreement)
    counts = {c.op_type: c.to_dict() for c in result.op_counts}
    assert counts == {"Linear": {"int8": 2, "fp32": 1, "not_quantizable": 0, "total": 3},
                      "Embedding": {"int8": 0, "fp32": 0, "not_quantizable": 1, "total": 1}}
    text = "2 of 3 Linear (1 left FP32); 0 of 1 Embedding (1 not quantizable)"
    assert f"quantized (whole model): {text}" in caplog.text
    assert "whole model: 3 Linear (3 in the space); 1 Embedding (0 in the space)" in caplog.text
    console = Console(width=200, record=True)
    console.print(summary_table(result))
    assert text in console.export_text()
    record = json.loads((result.save(tmp_path) / "result.json").read_text())
    assert record["quantized"] == text and record["op_counts"] == counts


def test_a_pass_slower_than_fp32_does_not_stop_the_search(case):
    """All-INT8 passes at x1.3; each op left FP32 makes it faster. The tuner goes on past the first
    pass and stops at the first pass faster than FP32, which it returns."""
    model, calib, agreement = case
    result = Tuner(EVERYTHING_PASSES, strategy="random", max_trials=20, seed=0,
                   latency_fn=fixed_latency(lambda c: 1.3 - 0.25 * len(c.fp32_ops))).tune(model, calib, agreement)
    ratios = result.history["latency_ratio"].tolist()
    assert ratios[0] == pytest.approx(1.3) and result.trials > 1
    assert result.met and not result.slower_than_fp32
    assert result.latency_ratio == min(ratios) < 1.0 and sum(r < 1.0 for r in ratios) == 1  # stopped at it
    assert result.latency_precision == pytest.approx(0.01)
    assert result.summary()["verdict"].startswith("goal met at x")


def test_when_no_pass_is_faster_than_fp32_it_says_so(case, tmp_path, caplog):
    model, calib, agreement = case
    caplog.set_level(logging.INFO, logger="autoquant")
    result = Tuner(EVERYTHING_PASSES, strategy="random", max_trials=3, seed=0,
                   latency_fn=fixed_latency(lambda c: 1.4 + 0.1 * len(c.fp32_ops))).tune(model, calib, agreement)
    assert result.trials == 3 and result.met and result.slower_than_fp32
    assert result.latency_ratio == pytest.approx(1.4)  # the fastest pass is returned
    assert "searching on (within max_trials=3)" in caplog.text
    assert "No passing candidate is faster than FP32" in caplog.text
    record = json.loads((result.save(tmp_path) / "result.json").read_text())
    assert record["slower_than_fp32"] and "no passing candidate ran faster than FP32" in record["verdict"]
    console = Console(width=200, record=True)
    console.print(summary_table(result))
    assert "goal MET, but SLOWER than FP32" in console.export_text()


def test_measured_latency_int8_slower_goes_on_and_records_its_precision(case):
    """No seam: latency measured on the backend. INT8 tiny Linears lose to FP32, so the default
    candidate passes slower than FP32 and the search does not stop there."""
    model, calib, agreement = case
    result = Tuner(EVERYTHING_PASSES, strategy="random", max_trials=3, seed=0,
                   latency_budget_s=0.3).tune(model, calib, agreement)
    first = result.history.iloc[0]
    assert first["passed"] and first["latency_ratio"] > 1.0  # the premise: INT8 is slower here
    assert result.trials > 1
    assert result.slower_than_fp32 == (result.latency_ratio >= 1.0)
    assert result.history["latency_precision"].notna().all() and result.latency_precision is not None


def test_latency_precision_must_be_positive():
    from autoquant.errors import ConfigError

    with pytest.raises(ConfigError, match="latency_precision"):
        Tuner(latency_precision=0)


def test_a_goal_finer_than_the_metrics_step_is_said_in_the_log_result_and_summary(tmp_path, caplog):
    """An accuracy over 597 samples moves in steps of 1/597; a 0.1% goal at 0.9 allows 0.0009, less
    than one step: the job says so once, names the least goal that means something, and keeps going."""
    from tests.fake_adapter import FakeAdapter, fake_model

    caplog.set_level(logging.INFO, logger="autoquant")
    model = fake_model(n_ops=3, sensitive={0: 2 / 597, 1: 1 / 597, 2: 0.0})

    def counted(m) -> float:  # the fake accuracy as a share of 597 samples, in float32 as torch returns it
        return float(torch.tensor(round(m.accuracy() * 597) / 597, dtype=torch.float32))

    result = Tuner(AccuracyCriterion(relative=0.001), strategy="exhaustive", max_trials=8,
                   restrict=Restriction(calibration="minmax", scheme="asymmetric", granularity="per_channel"),
                   latency_fn=fixed_latency(lambda c: 0.5 + 0.1 * len(c.fp32_ops))).tune(
        model, [None], counted, adapter=FakeAdapter)
    assert result.met and result.metric_step == pytest.approx(1 / 597)
    assert caplog.text.count("The goal is finer than the metric can tell") == 1
    assert "1/597" in caplog.text
    assert json.loads((result.save(tmp_path) / "result.json").read_text())["metric_step"] == pytest.approx(1 / 597)
    console = Console(width=250, record=True)
    console.print(summary_table(result))
    assert "single samples decide" in console.export_text()


def test_no_step_is_said_where_the_goal_allows_more_than_one(caplog):
    from tests.fake_adapter import FakeAdapter, fake_model

    caplog.set_level(logging.INFO, logger="autoquant")
    model = fake_model(n_ops=3, sensitive={0: 2 / 597, 1: 1 / 597, 2: 0.0})
    result = Tuner(AccuracyCriterion(relative=0.01), strategy="exhaustive", max_trials=3,
                   latency_fn=fixed_latency(lambda c: 0.5)).tune(
        model, [None], lambda m: round(m.accuracy() * 597) / 597, adapter=FakeAdapter)
    assert result.metric_step is None and "finer than the metric" not in caplog.text
