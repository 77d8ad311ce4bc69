"""The contract every adapter owes every zoo model (issue 14), as plain functions.

Used by ``tests/test_zoo.py`` (CI size, a bounded sample of fallbacks) and ``experiments/zoo.py``
(the table). Each check raises ``AssertionError`` with what broke, or the backend's own error:

- ``coverage``: every Conv/Linear is an op of the space or named in ``space.unsupported`` with a
  reason (FX: every nn.Conv*/nn.Linear call and every F.conv*/F.linear call, named after the
  module that makes it; ONNX: every Conv, MatMul and Gemm node), and no op without an INT8 kernel
  (Dropout, Identity) is offered.
- ``default``: the default candidate builds and runs to finite outputs.
- ``fallback``: each single-op fallback builds and runs.
- ``fp32``: the candidate with every op in FP32 builds and matches the FP32 model.
- ``save_load``: the default candidate saved and loaded gives the same outputs.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from autoquant.adapters.base import Adapter
from autoquant.errors import first_line
from autoquant.examples.zoo import ZooCase, export_onnx
from autoquant.probe import flatten_outputs
from autoquant.space import QuantConfig, Space

ADAPTERS = ("fx", "onnx")
CHECKS = ("coverage", "default", "fallback", "fp32", "save_load")
WEIGHTED_ONNX_OPS = ("Conv", "MatMul", "Gemm")
NO_KERNEL_TYPES = ("Dropout", "Identity")
# Relative L2 error of the all-FP32 candidate against the FP32 model: float reordering (a BN
# folded into a conv) stays near 1e-6; any INT8 op left in the graph costs 1e-3 or more.
FP32_TOLERANCE = 1e-4
SAVE_LOAD_TOLERANCE = 1e-5
_WEIGHTED_FUNCTIONS = (F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d,
                       F.conv_transpose3d, F.linear)


def make_adapter(case: ZooCase, adapter: str, onnx_model: bytes | None = None) -> Adapter:
    """The adapter for the case's model: FX on the module, ONNX on its export (``onnx_model``, or
    exported here) with numpy feeds."""
    if adapter == "fx":
        from autoquant.adapters.fx import FXAdapter

        return FXAdapter(case.model, case.calib_batches)
    if adapter == "onnx":
        from autoquant.adapters.onnx import ONNXAdapter

        return ONNXAdapter(onnx.load_from_string(onnx_model or export_onnx(case)), case.feeds())
    raise ValueError(f"Unknown adapter '{adapter}': use one of {ADAPTERS}.")


# --- coverage --------------------------------------------------------------------------------------
def weighted_ops(case: ZooCase, adapter: Adapter, onnx_model: bytes | None = None) -> list[str]:
    """The names each Conv/Linear must be accounted for by, in the adapter's own terms (ONNX: the
    nodes of ``onnx_model``, the export the adapter was given, or a new, identical export)."""
    if adapter.name == "onnx":
        proto = onnx.load_from_string(onnx_model or export_onnx(case))
        return [n.name for n in proto.graph.node if n.op_type in WEIGHTED_ONNX_OPS]
    return conv_linear_owners(case.model, case.example)


def conv_linear_owners(model: nn.Module, example: Any) -> list[str]:
    """Paths of the modules whose forward calls a conv or linear function, in call order, once each.

    nn.Conv2d and nn.Linear call F.conv2d / F.linear themselves, so this finds the plain modules,
    conv subclasses with their own forward, and functional calls alike.
    """
    stack: list[str] = []
    owners: dict[str, None] = {}

    class Recorder(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
            if func in _WEIGHTED_FUNCTIONS:
                owners.setdefault(stack[-1] if stack else type(model).__name__)
            return func(*args, **(kwargs or {}))

    def enter(path: str) -> None:
        stack.append(path)

    def leave(*_: Any) -> None:  # a forward hook that returns a value would replace the output
        stack.pop()

    hooks = []
    for path, module in model.named_modules():
        if path:
            hooks.append(module.register_forward_pre_hook(lambda *_, path=path: enter(path)))
            hooks.append(module.register_forward_hook(leave))
    try:
        with torch.inference_mode(), Recorder():
            model(**example) if isinstance(example, dict) else model(example)
    finally:
        for hook in hooks:
            hook.remove()
    return list(owners)


def unaccounted(expected: Sequence[str], space: Space) -> list[str]:
    """The expected names that no op and no unsupported entry names (itself, or a part of it,
    as in "layer.0.conv:1"): a module is accounted for by an entry naming it."""
    names = [op.name for op in space.ops] + [u.name for u in space.unsupported if u.reason.strip()]

    def named(owner: str) -> bool:
        return any(n == owner or (n.startswith(owner) and not _continues_name(n[len(owner)])) for n in names)

    return [owner for owner in expected if not named(owner)]


def _continues_name(char: str) -> bool:
    return char.isalnum() or char == "_"


def check_coverage(case: ZooCase, adapter: Adapter, onnx_model: bytes | None = None) -> None:
    missing = unaccounted(weighted_ops(case, adapter, onnx_model), adapter.space)
    assert not missing, (f"{len(missing)} Conv/Linear neither in the space nor in space.unsupported: "
                         f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    no_kernel = [op.name for op in adapter.space.ops if op.op_type in NO_KERNEL_TYPES]
    assert not no_kernel, f"ops without an INT8 kernel offered in the space: {', '.join(no_kernel[:5])}"


# --- candidates ------------------------------------------------------------------------------------
def candidate(space: Space, fp32_ops: Sequence[str] = ()) -> QuantConfig:
    """The default config with ``fp32_ops`` in FP32, resolved as the tuner builds it."""
    return space.resolve(space.canonical(replace(space.default_config(), fp32_ops=frozenset(fp32_ops))))


def outputs(adapter: Adapter, model: Any) -> np.ndarray:
    """The model's outputs on the adapter's fixed batch, as one float vector."""
    return flatten_outputs(adapter.runner(model)())


def relative_error(values: np.ndarray, reference: np.ndarray) -> float:
    """||values - reference|| / ||reference|| (L2)."""
    if values.shape != reference.shape:
        raise AssertionError(f"output shapes differ: {values.shape} vs {reference.shape}")
    return float(np.linalg.norm(values - reference)) / max(float(np.linalg.norm(reference)), 1e-30)


def build_and_run(adapter: Adapter, config: QuantConfig) -> tuple[Any, np.ndarray]:
    model = adapter.build(config)
    values = outputs(adapter, model)
    assert np.isfinite(values).all(), f"non-finite outputs from {config.describe()}"
    return model, values


def fallback_sample(space: Space, count: int | None = 3) -> list[str]:
    """Ops to fall back one at a time: all of them, or ``count`` spread over the graph
    (first, middle, last for 3), deterministically."""
    names = list(space.op_names)
    if count is None or count >= len(names):
        return names
    picks = np.linspace(0, len(names) - 1, count).round().astype(int)
    return [names[i] for i in dict.fromkeys(picks.tolist())]


def check_default(adapter: Adapter) -> Any:
    """The default candidate, built and run; returns it for ``check_save_load``."""
    return build_and_run(adapter, candidate(adapter.space))[0]


def fallback_failures(adapter: Adapter, ops: Sequence[str]) -> list[str]:
    """"op: error" for each single-op fallback of ``ops`` that fails to build or run."""
    failures = []
    for op in ops:
        try:
            build_and_run(adapter, candidate(adapter.space, [op]))
        except Exception as exc:  # every op is tried; the report lists all that failed
            failures.append(f"{op}: {first_line(exc, 300)}")
    return failures


def check_fallbacks(adapter: Adapter, ops: Sequence[str]) -> None:
    failures = fallback_failures(adapter, ops)
    assert not failures, f"{len(failures)} of {len(ops)} single-op fallbacks failed; first: {failures[0]}"


def all_fp32_error(adapter: Adapter) -> float:
    """The all-FP32 candidate's relative output error against the FP32 model."""
    _, values = build_and_run(adapter, candidate(adapter.space, adapter.space.op_names))
    return relative_error(values, outputs(adapter, adapter.fp32_model))


def check_all_fp32(adapter: Adapter) -> None:
    error = all_fp32_error(adapter)
    assert error <= FP32_TOLERANCE, f"all-FP32 candidate differs from the FP32 model: relative error {error:.2e}"


def check_save_load(adapter: Adapter, model: Any) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = adapter.save_model(adapter.result_model(model), Path(folder))
        loaded = type(adapter).load_model(path)
    if adapter.name == "onnx":
        from autoquant.adapters.onnx import ORTSession

        loaded = ORTSession(loaded)
    error = relative_error(outputs(adapter, loaded), outputs(adapter, model))
    assert error <= SAVE_LOAD_TOLERANCE, f"saved and loaded model differs: relative error {error:.2e}"
