"""Does ONNX Runtime's CPU EP run BF16 (or FP16) MatMul/Gemm faster than FP32 on this CPU?

For each op and precision: a chain of four 384x1536 / 1536x384 layers (MiniLM's FFN sizes) on
4096 rows (batch 32 x sequence 128), with the weights stored in that precision and Casts at the
chain's ends, as a per-op fallback precision would write it. Reports whether the session loads
(a kernel exists for the type) and the latency ratio against FP32 (interleaved pairs).

    flock /work/timing.lock python experiments/onnx_bf16.py
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from autoquant.errors import first_line
from autoquant.latency import measure_ratio

ROWS, HIDDEN, FFN = 4096, 384, 1536
TYPES = {"float32": TensorProto.FLOAT, "bfloat16": TensorProto.BFLOAT16, "float16": TensorProto.FLOAT16}


def chain(op: str, elem: int) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Cast", ["x"], ["h0"], to=elem)]
    inits = []
    for i in range(4):
        k, n = (HIDDEN, FFN) if i % 2 == 0 else (FFN, HIDDEN)
        w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
        tensor = numpy_helper.from_array(w, f"w{i}")
        if elem != TensorProto.FLOAT:
            tensor = helper.make_tensor(f"w{i}", elem, w.shape, _as(w, elem).tobytes(), raw=True)
        inits.append(tensor)
        if op == "MatMul":
            nodes.append(helper.make_node("MatMul", [f"h{i}", f"w{i}"], [f"h{i + 1}"]))
        else:
            nodes.append(helper.make_node("Gemm", [f"h{i}", f"w{i}"], [f"h{i + 1}"]))
    nodes.append(helper.make_node("Cast", ["h4"], ["y"], to=TensorProto.FLOAT))
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [ROWS, HIDDEN])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [ROWS, HIDDEN])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _as(w: np.ndarray, elem: int) -> np.ndarray:
    if elem == TensorProto.FLOAT16:
        return w.astype(np.float16)
    return (w.view(np.uint32) >> 16).astype(np.uint16)  # bfloat16: the top half of the float32 bits


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def main() -> None:
    x = {"x": np.random.default_rng(1).standard_normal((ROWS, HIDDEN)).astype(np.float32)}
    print(f"onnxruntime {ort.__version__}, CPUExecutionProvider")
    print("| op | precision | loads on CPU EP | latency / FP32 | 95% CI (pairs) |\n|---|---|---|---|---|")
    for op in ("MatMul", "Gemm"):
        fp32 = session(chain(op, TensorProto.FLOAT))
        for name, elem in TYPES.items():
            if elem == TensorProto.FLOAT:
                continue
            try:
                other = session(chain(op, elem))
                other.run(None, x)
            except Exception as exc:  # no kernel for the type: ORT says which node and type
                print(f"| {op} | {name} | no: {first_line(exc, 160)} | - | - |", flush=True)
                continue
            ratio = measure_ratio(lambda f=fp32: f.run(None, x), lambda s=other: s.run(None, x), budget_s=8.0,
                                  precision=0.03)
            print(f"| {op} | {name} | yes | {ratio.ratio:.2f} | {ratio.low:.2f}-{ratio.high:.2f} ({ratio.pairs}) |",
                  flush=True)


if __name__ == "__main__":
    main()
