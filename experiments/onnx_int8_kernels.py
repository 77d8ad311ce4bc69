"""Which static QDQ placements ONNX Runtime fuses into INT8 kernels on this CPU, and how fast each runs.

all-MiniLM-L6-v2 (ONNX, opset 17, after ORT's basic optimisations, as the adapter sees it) is
quantized by ORT's own ``quantize_static`` (min-max over two random-token batches: only speed is
measured here, accuracy comes from the tuner) with growing sets of op types, and for each variant:
the kernels the CPU session runs after its optimisations (QLinearMatMul, MatMulIntegerToFloat,
QLinearAdd, ... and the Q/DQ nodes left unfused) and the INT8/FP32 latency ratio at batch 32 x
sequence 128, measured in interleaved pairs (``measure_ratio``). Writes
experiments/results/onnx_int8_kernels.md (docs/onnx-int8-kernels.md reads it) unless --no-write.

    flock /work/timing.lock python experiments/onnx_int8_kernels.py [--budget 12]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, quantize_static

from autoquant.adapters.onnx import _basic_optimized
from autoquant.examples import text
from autoquant.latency import measure_ratio

RESULT = Path(__file__).resolve().parent / "results" / "onnx_int8_kernels.md"
KERNELS = ("QLinearMatMul", "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QLinearAdd", "QLinearMul",
           "QLinearSoftmax", "QAttention", "QGemm", "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear",
           "MatMulInteger", "LayerNormalization", "SkipLayerNormalization", "Gelu", "BiasGelu", "FusedMatMul")


@dataclass
class Variant:
    name: str
    op_types: tuple[str, ...] = ()
    weight_only: bool = False  # exclude the activation-by-activation MatMuls
    matmul_output: bool = False  # quantize MatMul outputs (QLinearMatMul) instead of float (MatMulIntegerToFloat)
    activation: QuantType = QuantType.QUInt8
    per_channel: bool = True
    dynamic: bool = False
    fused: bool = False  # ORT's transformer optimizer first (Attention, SkipLayerNorm, ...): dynamic gives QAttention
    extra: dict = field(default_factory=dict)


VARIANTS = [
    Variant("dynamic, weight MatMuls (today's winner)", ("MatMul",), dynamic=True),
    Variant("transformer fusion, FP32", fused=True),
    Variant("transformer fusion + dynamic (QAttention)", ("MatMul", "Attention"), dynamic=True, fused=True),
    Variant("static weight MatMuls, float out", ("MatMul",), weight_only=True),
    Variant("static all MatMuls (+ QxK^T, attn x V), float out", ("MatMul",)),
    Variant("static all MatMuls, u8 out (QLinearMatMul)", ("MatMul",), matmul_output=True),
    Variant("static MatMuls + Add", ("MatMul", "Add")),
    Variant("static MatMuls + Add, u8 out", ("MatMul", "Add"), matmul_output=True),
    Variant("static MatMuls + Add + Softmax", ("MatMul", "Add", "Softmax")),
    Variant("static MatMuls + Add + LayerNorm", ("MatMul", "Add", "LayerNormalization")),
    Variant("static MatMuls + Add + Mul/Div/Erf (GELU)", ("MatMul", "Add", "Mul", "Div", "Erf")),
    Variant("static all MatMuls, s8 activations", ("MatMul",), activation=QuantType.QInt8),
    Variant("static all MatMuls, per-tensor weights", ("MatMul",), per_channel=False),
]


class _Reader(CalibrationDataReader):
    def __init__(self, batches: list[dict[str, np.ndarray]]) -> None:
        self._it = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)


def feeds(batch: int, length: int, seed: int) -> dict[str, np.ndarray]:
    ids = np.random.default_rng(seed).integers(1000, 30000, size=(batch, length), dtype=np.int64)
    ids[:, 0], ids[:, -1] = 101, 102
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}


def session(path: str, optimized: str | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if optimized:
        options.optimized_model_filepath = optimized
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def quantize(variant: Variant, fp32_path: str, out_path: str, act_x_act: list[str], calib: list[dict]) -> None:
    if variant.fused:
        from onnxruntime.transformers.optimizer import optimize_model

        fused = optimize_model(fp32_path, model_type="bert", num_heads=12, hidden_size=384, opt_level=0)
        fp32_path = out_path + ".fused.onnx"
        fused.save_model_to_file(fp32_path)
        if not variant.op_types:
            os.replace(fp32_path, out_path)
            return
    if variant.dynamic:
        quantize_dynamic(fp32_path, out_path, op_types_to_quantize=list(variant.op_types), per_channel=True,
                         weight_type=QuantType.QInt8,
                         extra_options={"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT})
        return
    extra = {"ActivationSymmetric": variant.activation == QuantType.QInt8, **variant.extra}
    if not variant.matmul_output:
        extra["OpTypesToExcludeOutputQuantization"] = ["MatMul"]
    quantize_static(fp32_path, out_path, _Reader(calib), quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=list(variant.op_types), per_channel=variant.per_channel,
                    activation_type=variant.activation, weight_type=QuantType.QInt8,
                    nodes_to_exclude=act_x_act if variant.weight_only else [], extra_options=extra)


def kernels(path: str, tmp: str) -> str:
    optimized = os.path.join(tmp, "optimized.onnx")
    session(path, optimized)
    counts = collections.Counter(n.op_type for n in onnx.load(optimized).graph.node)
    return ", ".join(f"{k} {counts[k]}" for k in KERNELS if counts[k])


def profile(path: str, run_feeds: dict, tmp: str, runs: int = 3) -> str:
    """Share of kernel time per op type (ORT's profiler), and ms per run."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.enable_profiling = True
    options.profile_file_prefix = os.path.join(tmp, "profile")
    s = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    for _ in range(runs):
        s.run(None, run_feeds)
    by_op: collections.Counter = collections.Counter()
    for event in json.loads(Path(s.end_profiling()).read_text()):
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            by_op[event["args"]["op_name"]] += event["dur"]
    total = sum(by_op.values())
    return f"{total / runs / 1e3:.0f} ms: " + ", ".join(f"{k} {v / total:.0%}" for k, v in by_op.most_common(8))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=12.0, help="seconds of timing per variant")
    parser.add_argument("--only", type=int, nargs="*", help="variant indices")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--profile", type=int, nargs="*", default=[0, 3], help="variants to profile (FP32 always)")
    args = parser.parse_args()
    model = _basic_optimized(onnx.load_from_string(text.export_minilm()))
    init = {i.name for i in model.graph.initializer}
    act_x_act = [n.name for n in model.graph.node if n.op_type == "MatMul" and not set(n.input) & init]
    run_feeds = feeds(32, 128, 0)
    calib = [feeds(16, 128, 1), feeds(16, 128, 2)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        fp32_path = os.path.join(tmp, "fp32.onnx")
        onnx.save(model, fp32_path)
        fp32 = session(fp32_path)
        rows.append(("FP32 (ORT graph optimisations)", "1.00", "", kernels(fp32_path, tmp)))
        profiles = [("FP32", profile(fp32_path, run_feeds, tmp))]
        print(rows[-1], profiles[-1], flush=True)
        for index, variant in enumerate(VARIANTS):
            if args.only and index not in args.only:
                continue
            path = os.path.join(tmp, f"v{index}.onnx")
            quantize(variant, fp32_path, path, act_x_act, calib)
            int8 = session(path)
            ratio = measure_ratio(lambda: fp32.run(None, run_feeds), lambda s=int8: s.run(None, run_feeds),
                                  budget_s=args.budget, precision=0.03)
            rows.append((variant.name, f"{ratio.ratio:.2f}", f"{ratio.low:.2f}-{ratio.high:.2f} ({ratio.pairs})",
                         kernels(path, tmp)))
            if index in args.profile:
                profiles.append((variant.name, profile(path, run_feeds, tmp)))
            print(rows[-1], flush=True)
    table = ["| variant | INT8/FP32 | 95% CI (pairs) | kernels after ORT's optimisations |", "|---|---|---|---|"]
    table += [f"| {' | '.join(row)} |" for row in rows]
    table += ["", "Kernel time per op type (ORT profiler, batch 32 x sequence 128):", "",
              "| model | ms per run: share of kernel time |", "|---|---|"]
    table += [f"| {name} | {text} |" for name, text in profiles]
    print("\n".join(table))
    if not args.no_write:
        command = "Command: `flock /work/timing.lock python experiments/onnx_int8_kernels.py`\n\n"
        RESULT.write_text(command + "\n".join(table) + "\n")


if __name__ == "__main__":
    main()
