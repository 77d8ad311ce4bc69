"""Every zoo model's ONNX export through the ONNX adapter (CI size): every Conv/MatMul/Gemm is in
the space or in ``unsupported``; the default build, a single-op fallback and the all-FP32 build
run, and all-FP32 gives the FP32 model's outputs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from autoquant.adapters.onnx import ONNXAdapter
from autoquant.examples.zoo import ZOO, export_onnx
from autoquant.space import QuantConfig

HEAVY = ("Conv", "MatMul", "Gemm")
# One of each structure (residual adds, ReLU6 + Pad, conv subclass + SE + dynamic pads, concat +
# upsampling, conv + attention, text), to keep the suite fast; the held-out entries stay out.
# Every entry passed these checks on 2026-11-30 (pytest -k with the full ZOO list).
MODELS = ["resnet", "mobilenet_v2", "tf_effnet", "dense_unet", "mobilevit", "bert"]


@pytest.fixture(scope="module", params=MODELS)
def zoo(request):
    case = ZOO[request.param].build("ci")
    adapter = ONNXAdapter(onnx.load_from_string(export_onnx(case)), case.feeds())
    adapter.calibrate()
    return case, adapter


def _run(session, feeds) -> list[np.ndarray]:
    return session.run(None, feeds)


def test_every_conv_matmul_gemm_is_accounted_for(zoo):
    _, adapter = zoo
    heavy = {n.name for n in adapter._inferred.graph.node if n.op_type in HEAVY}
    listed = set(adapter.space.op_names) | {u.name for u in adapter.space.unsupported}
    assert heavy <= listed, sorted(heavy - listed)
    assert all(u.reason for u in adapter.space.unsupported)


def test_default_fallback_and_all_fp32_builds_run(zoo):
    case, adapter = zoo
    feeds = case.feeds([case.example])[0]
    reference = _run(adapter.fp32_model, feeds)
    space = adapter.space
    default = space.default_config()
    int8 = _run(adapter.build(space.resolve(default)), feeds)
    assert all(np.isfinite(o).all() and o.shape == r.shape for o, r in zip(int8, reference, strict=False))
    tunable = space.tunable_ops(default.approach)
    one = QuantConfig(default.approach, default.calibration, default.granularity, default.scheme,
                      fp32_ops={tunable[len(tunable) // 2].name})
    assert all(np.isfinite(o).all() for o in _run(adapter.build(space.resolve(one)), feeds))
    every = QuantConfig(default.approach, default.calibration, default.granularity, default.scheme,
                        fp32_ops={op.name for op in tunable})
    for out, ref in zip(_run(adapter.build(space.resolve(every)), feeds), reference, strict=False):
        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)
