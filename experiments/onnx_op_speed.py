"""INT8/FP32 latency per conv/Gemm kind through the ONNX adapter on this CPU.

Each case is a chain of four identical ops (so the quantize at the input and the dequantize at
the output are amortised, as inside a network), quantized with the adapter's default config and
timed against FP32 with ``measure_ratio`` (interleaved pairs until the median ratio is known to
+-5%, or 20 s). Writes experiments/results/onnx_op_speed.md.

    python experiments/onnx_op_speed.py [--batch 8]
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from autoquant.adapters.onnx import ONNXAdapter
from autoquant.latency import measure_ratio

# name: (channels, spatial size, kernel, groups = channels for depthwise)
CASES = {
    "conv3x3 dense, 16 ch, 56x56": (16, 56, 3, 1),
    "conv3x3 dense, 64 ch, 56x56": (64, 56, 3, 1),
    "conv3x3 dense, 256 ch, 14x14": (256, 14, 3, 1),
    "conv1x1, 32 ch, 112x112": (32, 112, 1, 1),
    "conv1x1, 192 ch, 28x28": (192, 28, 1, 1),
    "conv1x1, 960 ch, 7x7": (960, 7, 1, 1),
    "depthwise3x3, 32 ch, 112x112": (32, 112, 3, 32),
    "depthwise3x3, 144 ch, 56x56": (144, 56, 3, 144),
    "depthwise3x3, 960 ch, 7x7": (960, 7, 3, 960),
}


def conv_chain(channels: int, kernel: int, groups: int, depth: int = 4) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i in range(depth):
        w = rng.standard_normal((channels, channels // groups, kernel, kernel)).astype(np.float32) * 0.1
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(np.zeros(channels, np.float32), f"b{i}")]
        nodes += [helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [f"c{i}"], name=f"conv{i}", group=groups,
                                   pads=[kernel // 2] * 4),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}")]
        x = f"r{i}"
    shape: list[str | int | None] = ["N", channels, None, None]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, shape)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def gemm_chain(features: int, depth: int = 4) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i in range(depth):
        inits += [numpy_helper.from_array(rng.standard_normal((features, features)).astype(np.float32) * 0.05, f"w{i}"),
                  numpy_helper.from_array(np.zeros(features, np.float32), f"b{i}")]
        nodes += [helper.make_node("Gemm", [x, f"w{i}", f"b{i}"], [f"g{i}"], name=f"gemm{i}"),
                  helper.make_node("Relu", [f"g{i}"], [f"r{i}"], name=f"relu{i}")]
        x = f"r{i}"
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", features])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["N", features])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def ratio(model: onnx.ModelProto, batch: np.ndarray) -> str:
    adapter = ONNXAdapter(model, [batch])
    int8 = adapter.build(adapter.space.resolve(adapter.space.default_config()))
    result = measure_ratio(adapter.runner(adapter.fp32_model), adapter.runner(int8), budget_s=20)
    return f"{result.ratio:.2f} | {result.low:.2f}-{result.high:.2f} | {result.pairs}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "onnx_op_speed.md"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    rng = np.random.default_rng(1)
    rows = []
    for name, (channels, size, kernel, groups) in CASES.items():
        x = rng.standard_normal((args.batch, channels, size, size)).astype(np.float32)
        rows.append(f"| {name} | {ratio(conv_chain(channels, kernel, groups), x)} |")
        print(rows[-1], flush=True)
    for features in (256, 1280):
        x = rng.standard_normal((args.batch * 8, features)).astype(np.float32)
        rows.append(f"| Gemm {features}x{features}, {args.batch * 8} rows | {ratio(gemm_chain(features), x)} |")
        print(rows[-1], flush=True)
    text = (f"# ONNX Runtime INT8/FP32 latency per op kind (chains of 4 ops + Relu, batch {args.batch})\n\n"
            "Command: `python experiments/onnx_op_speed.py`. INT8 = the adapter's default config (uint8 activations,\n"
            "int8 per-channel weights, QDQ fused by ORT). Ratio = median of interleaved per-pair ratios, with its\n"
            "95% confidence interval; below 1 INT8 is faster.\n\n"
            "| case | INT8/FP32 | 95% CI | pairs |\n|---|---|---|---|\n" + "\n".join(rows) + "\n")
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
