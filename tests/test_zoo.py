"""The structural model zoo (autoquant.examples.zoo), CI-sized: every entry builds, runs and exports."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from autoquant.examples.zoo import HELD_OUT, ZOO, export_onnx
from autoquant.probe import flatten_outputs

NAMES = list(ZOO)


def fp32_outputs(model: torch.nn.Module, batch) -> np.ndarray:
    with torch.inference_mode():
        return flatten_outputs(model(**batch) if isinstance(batch, dict) else model(batch))


def test_zoo_is_wide_and_holds_two_cases_out() -> None:
    assert len(ZOO) >= 12
    assert {e.kind for e in ZOO.values()} == {"cnn", "vit", "text"}
    assert HELD_OUT == ("regnet", "albert")


@pytest.mark.parametrize("name", NAMES)
def test_entry_builds_runs_and_exports(name: str) -> None:
    case = ZOO[name].build("ci")
    assert not case.model.training
    reference = fp32_outputs(case.model, case.example)
    assert np.isfinite(reference).all() and reference.std() > 1e-3  # activations neither vanish nor blow up
    session = ort.InferenceSession(export_onnx(case), providers=["CPUExecutionProvider"])
    batches = case.calib_batches[:1] + [_smaller(case.example)]  # the export is not tied to one batch shape
    for batch, feeds in zip(batches, case.feeds(batches), strict=False):
        np.testing.assert_allclose(session.run(None, feeds)[0].ravel(), fp32_outputs(case.model, batch),
                                   rtol=1e-3, atol=1e-4)


def _smaller(batch):
    """One sample; text also shorter (dynamic batch and sequence axes)."""
    if isinstance(batch, dict):
        return {k: v[:1, :10] for k, v in batch.items()}
    return batch[:1]


def test_build_is_deterministic() -> None:
    first, second = ZOO["tf_effnet"].build("ci"), ZOO["tf_effnet"].build("ci")
    torch.testing.assert_close(first.example, second.example)
    np.testing.assert_array_equal(fp32_outputs(first.model, first.example), fp32_outputs(second.model, second.example))
