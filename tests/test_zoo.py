"""The structural model zoo (issue 14), CI-sized, through both adapters.

Every zoo model builds, runs and exports; then each model x adapter must meet the contract of
``autoquant.examples.zoo_checks``: coverage (every Conv/Linear in the space or in
``space.unsupported``), default (the default candidate runs), fallback (single-op fallbacks build
and run: every op of the two torch.nn models built for the boundary cases, ``FALLBACKS`` ops
spread over the graph (first/middle/last) elsewhere; the full set runs in ``experiments/zoo.py``),
fp32 (the all-FP32 candidate matches FP32) and save_load.

What fails today is listed in KNOWN_FAILURES with the first line of the error seen, and runs as a
strict xfail: when a fix makes one pass, the test fails until its entry is deleted.
"""

from __future__ import annotations

import functools

import numpy as np
import onnxruntime as ort
import pytest
import torch

from autoquant.examples import zoo_checks as checks
from autoquant.examples.zoo import HELD_OUT, ZOO, ZooCase, export_onnx
from autoquant.probe import flatten_outputs

NAMES = list(ZOO)
FALLBACKS = 3
# Built for the structures where a fallback meets an INT8 consumer (residual add, SE mul, concat): every op.
ALL_FALLBACKS = ("tf_effnet", "dense_unet")

# (model, adapter, check) -> the first line of the error observed. Delete an entry when it passes.
KNOWN_FAILURES: dict[tuple[str, str, str], str] = {}


@functools.cache
def case(name: str) -> ZooCase:
    return ZOO[name].build("ci")


def once(fn):  # noqa: ANN001, ANN201
    """Cache the result or the exception: each model x adapter is built once for all its checks."""
    @functools.cache
    def outcome(*args):  # noqa: ANN002, ANN202
        try:
            return fn(*args), None
        except Exception as exc:  # re-raised by every check that needs it
            return None, exc

    @functools.wraps(fn)
    def call(*args):  # noqa: ANN002, ANN202
        value, error = outcome(*args)
        if error is not None:
            raise error
        return value

    return call


@functools.cache
def onnx_export(name: str) -> bytes:
    return export_onnx(case(name))


@once
def calibrated(name: str, adapter: str):  # noqa: ANN201
    built = checks.make_adapter(case(name), adapter, onnx_export(name) if adapter == "onnx" else None)
    built.calibrate()
    return built


@once
def default_model(name: str, adapter: str):  # noqa: ANN201
    return checks.check_default(calibrated(name, adapter))


def fp32_outputs(model: torch.nn.Module, batch) -> np.ndarray:  # noqa: ANN001
    with torch.inference_mode():
        return flatten_outputs(model(**batch) if isinstance(batch, dict) else model(batch))


def test_zoo_is_wide_and_holds_two_cases_out() -> None:
    assert len(ZOO) >= 12
    assert {e.kind for e in ZOO.values()} == {"cnn", "vit", "text"}
    assert HELD_OUT == ("regnet", "albert")


@pytest.mark.parametrize("name", NAMES)
def test_entry_builds_runs_and_exports(name: str) -> None:
    built = case(name)
    assert not built.model.training
    reference = fp32_outputs(built.model, built.example)
    assert np.isfinite(reference).all() and reference.std() > 1e-3  # activations neither vanish nor blow up
    session = ort.InferenceSession(onnx_export(name), providers=["CPUExecutionProvider"])
    batches = built.calib_batches[:1] + [_smaller(built.example)]  # the export is not tied to one batch shape
    for batch, feeds in zip(batches, built.feeds(batches), strict=False):
        np.testing.assert_allclose(session.run(None, feeds)[0].ravel(), fp32_outputs(built.model, batch),
                                   rtol=1e-3, atol=1e-4)


def _smaller(batch):  # noqa: ANN001, ANN202
    """One sample; text also shorter (dynamic batch and sequence axes)."""
    if isinstance(batch, dict):
        return {k: v[:1, :10] for k, v in batch.items()}
    return batch[:1]


def test_build_is_deterministic() -> None:
    first, second = ZOO["tf_effnet"].build("ci"), ZOO["tf_effnet"].build("ci")
    torch.testing.assert_close(first.example, second.example)
    np.testing.assert_array_equal(fp32_outputs(first.model, first.example), fp32_outputs(second.model, second.example))


def test_conv_subclasses_and_functional_calls_are_found_by_their_module() -> None:
    """The coverage check itself: Conv2dSame's F.conv2d and a plain Linear are both named."""
    built = case("tf_effnet")
    owners = checks.conv_linear_owners(built.model, built.example)
    assert owners[0] == "stem.0" and owners[-1] == "classifier"
    assert "blocks.0.se.reduce" in owners
    convs = [n for n, m in built.model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert sorted(owners) == sorted(convs)


def _contract_cases():  # noqa: ANN202
    for name in NAMES:
        for adapter in checks.ADAPTERS:
            for check in checks.CHECKS:
                reason = KNOWN_FAILURES.get((name, adapter, check))
                marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
                yield pytest.param(name, adapter, check, marks=marks, id=f"{name}-{adapter}-{check}")


@pytest.mark.parametrize(("name", "adapter", "check"), list(_contract_cases()))
def test_contract(name: str, adapter: str, check: str) -> None:
    built = calibrated(name, adapter)
    if check == "coverage":
        checks.check_coverage(case(name), built, onnx_export(name) if adapter == "onnx" else None)
    elif check == "default":
        default_model(name, adapter)
    elif check == "fallback":
        checks.check_fallbacks(built, checks.fallback_sample(built.space, None if name in ALL_FALLBACKS else FALLBACKS))
    elif check == "fp32":
        checks.check_all_fp32(built)
    else:
        checks.check_save_load(built, default_model(name, adapter))


def test_known_failures_name_real_cases() -> None:
    for name, adapter, check in KNOWN_FAILURES:
        assert name in ZOO and adapter in checks.ADAPTERS and check in checks.CHECKS


def test_merge_combines_per_model_runs_into_one_table(tmp_path) -> None:  # noqa: ANN001
    import argparse

    import pandas as pd

    from experiments import zoo as bench

    def run(directory: str, rows: list, command: str) -> None:
        bench.write_report(rows, argparse.Namespace(out=tmp_path / directory, size="bench", fallbacks=3), command, 1.0)

    command = "python experiments/zoo.py --models"
    run("first", [bench.Row("resnet", "fx", "cnn", False, int8_vs_fp32=1.2, errors={"default": "slow"}),
                  bench.Row("regnet", "fx", "cnn", True, int8_vs_fp32=0.5)], f"{command} resnet regnet")
    run("rerun", [bench.Row("resnet", "fx", "cnn", False, int8_vs_fp32=0.8)], f"{command} resnet")
    path = bench.merge([tmp_path / "first", tmp_path / "rerun"], tmp_path / "merged", "bench")
    table = pd.read_csv(tmp_path / "merged" / "zoo_bench.csv")
    assert list(zip(table.model, table.int8_vs_fp32, strict=True)) == [("resnet", 0.8), ("regnet", 0.5)]  # zoo order
    text = path.read_text()
    assert "--models resnet regnet`" in text and "--models resnet`" in text  # both runs' commands
    design, held_out = text.split("## Held-out")
    assert "| resnet" in design and "regnet" not in design.split("## Design set")[1] and "| regnet" in held_out
    assert "slow" not in text  # the rerun's row replaced the first one, errors and all


@pytest.mark.parametrize("adapter", checks.ADAPTERS)
def test_tune_records_the_tuned_latency_and_what_the_tuner_says(adapter: str) -> None:
    from experiments import zoo as bench

    row = bench.Row("resnet", adapter, "cnn", False)
    bench._tune(case("resnet"), calibrated("resnet", adapter), onnx_export("resnet") if adapter == "onnx" else None,
                row, trials=2)
    assert row.errors == {} and row.crashes == 0
    assert row.tuned_trials is not None and 1 <= row.tuned_trials <= 2
    assert row.tuned_ratio is not None and row.tuned_ratio > 0
    assert row.tuned_verdict in ("faster than FP32", "SLOWER than FP32", "not met")


def test_op_type_latency_lists_every_type_of_the_space(capsys) -> None:  # noqa: ANN001
    from experiments import zoo_op_types

    assert zoo_op_types.main(["dense_unet", "onnx", "--size", "ci", "--budget", "0.1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    adapter = calibrated("dense_unet", "onnx")
    types = {op.op_type for op in adapter.space.tunable_ops(adapter.space.default_config().approach)}
    assert "all INT8: x" in lines[0] and len(lines) == 1 + len(types)
    assert all("only INT8 x" in line and "only FP32 x" in line for line in lines[1:])
