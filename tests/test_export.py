"""``TuneResult.save(..., onnx=True)``: an FX INT8 result as an ONNX file that ONNX Runtime runs."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from autoquant import AccuracyCriterion, Restriction, Tuner
from autoquant.errors import AutoquantError
from autoquant.latency import LatencyRatio


def faster(config, fp32_run, candidate_run) -> LatencyRatio:
    return LatencyRatio(0.5, 0.49, 0.51, 0.95, 10, 1.0, 0.5)  # stop at the first pass: export is under test


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    calib = [torch.randn(4, 3, 16, 16) for _ in range(2)]
    return model, calib


def tune(cnn, approach: str):
    model, calib = cnn
    return Tuner(AccuracyCriterion(absolute=1.0), strategy="random", max_trials=1, latency_fn=faster,
                 restrict=Restriction(approach=approach)).tune(model, calib, lambda m: 1.0, verbose=False)


def test_static_fx_result_exports_to_onnx_that_runs_the_same(cnn, tmp_path):
    result = tune(cnn, "static")
    result.save(tmp_path, onnx=True)
    record = json.loads((tmp_path / "result.json").read_text())
    assert record["onnx_file"] == "model.onnx" and record["model_file"]
    graph = onnx.load(tmp_path / "model.onnx").graph
    assert any(node.op_type in ("QLinearConv", "QuantizeLinear") for node in graph.node)  # INT8, not FP32
    x = torch.randn(4, 3, 16, 16)
    session = ort.InferenceSession(str(tmp_path / "model.onnx"))
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        want = result.model(x).numpy()
    assert np.abs(got - want).max() <= 0.05 * np.abs(want).max()


def test_dynamic_result_says_why_it_has_no_onnx_and_keeps_the_rest(cnn, tmp_path):
    result = tune(cnn, "dynamic")
    with pytest.raises(AutoquantError, match="approach: static"):
        result.save(tmp_path, onnx=True)
    record = json.loads((tmp_path / "result.json").read_text())
    assert record["model_file"] and (tmp_path / record["model_file"]).exists()  # nothing else lost
