"""What each adapter supplies to the contract suite (tests/test_adapter_contract.py): a small
model, its calibration batches, and probes that read a built model (is this op INT8, the scale of
its input, the number of its weight scales). A new adapter adds one case here."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import fx, nn

from autoquant.adapters.base import Adapter
from autoquant.adapters.fx import FXAdapter
from autoquant.adapters.onnx import ONNXAdapter, ORTSession
from tests.fake_adapter import FakeAdapter, FakeModel, fake_model

OUTLIER = 40.0  # in the first batch's first input: minmax keeps it, entropy clips it


@dataclass
class Case:
    """One adapter under the contract. ``lacks`` maps a capability the adapter does not have to
    the reason, which the tests that need it skip with."""

    adapter: type[Adapter]
    model: Callable[[], Any]  # a fresh FP32 model
    batches: Callable[[], list[Any]]  # calibration batches; the first holds an OUTLIER
    other_model: Callable[[], tuple[Any, list[Any]]]  # a model with other tensors, and its batches
    bad_batch: Any  # a batch the model cannot run
    ops: tuple[str, ...]
    unsupported: tuple[str, ...]
    input_op: str  # an op reading the model input
    weight_op: str  # an op with a weight of ``channels`` output channels
    channels: int
    outputs: Callable[[Any, Any], list[np.ndarray]]  # a model's outputs on a batch
    snapshot: Callable[[Any], Any]  # everything of an FP32 model that build must not change, comparable by ==
    is_int8: Callable[[Any, str], bool]
    input_scale: Callable[[Any, str], float] = lambda model, op: pytest.fail("no input-scale probe")
    weight_scales: Callable[[Any, str], int] = lambda model, op: pytest.fail("no weight-scale probe")
    lacks: dict[str, str] = field(default_factory=dict)


class Counting:
    """Calibration data that counts the batches it yields."""

    def __init__(self, batches: list[Any]) -> None:
        self.batches, self.yielded = batches, 0

    def __iter__(self) -> Iterator[Any]:
        for batch in self.batches:
            self.yielded += 1
            yield batch


# --- FX --------------------------------------------------------------------------------------------
class ConvNet(nn.Module):
    """conv, relu, a residual add, an FP32-only gelu, a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv(x))
        x = nn.functional.gelu(self.body(x) + x)
        return self.head(x.mean((2, 3)))


def fx_batches(n: int = 3) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    data = [torch.randn(4, 3, 8, 8, generator=gen) for _ in range(n)]
    data[0][0, 0, 0, 0] = OUTLIER
    return data


def _fx_model() -> nn.Module:
    torch.manual_seed(0)
    return ConvNet().eval()


def _fx_other() -> tuple[nn.Module, list[torch.Tensor]]:
    return nn.Sequential(nn.Flatten(), nn.Linear(192, 2)).eval(), fx_batches(2)


def _fx_outputs(model: nn.Module, batch: torch.Tensor) -> list[np.ndarray]:
    with torch.inference_mode():
        return [model(batch).numpy()]


def _fx_is_int8(model: nn.Module, op: str) -> bool:
    module = dict(model.named_modules()).get(op)
    if module is not None:
        return type(module).__module__.startswith(("torch.ao.nn.quantized", "torch.ao.nn.intrinsic.quantized"))
    if not isinstance(model, fx.GraphModule):
        return False  # not converted (every op FP32): the model's own float code
    return any(str(n.target) == f"quantized.{op}" for n in model.graph.nodes)  # a function op: add, mul, ...


def _fx_input_scale(model: fx.GraphModule, op: str) -> float:
    node = next(n for n in model.graph.nodes if n.op == "call_module" and n.target == op)
    quantize = node.args[0]
    return float(model.get_buffer(quantize.args[1].target))


def _fx_weight_scales(model: fx.GraphModule, op: str) -> int:
    weight = model.get_submodule(op).weight()  # type: ignore[operator]  # a quantized module's packed weight
    return weight.q_per_channel_scales().numel() if weight.qscheme() == torch.per_channel_affine else 1


FX = Case(
    FXAdapter, _fx_model, fx_batches, _fx_other, bad_batch=torch.randn(2, 5, 8, 8),
    ops=("conv", "body", "add", "head"), unsupported=("gelu",), input_op="conv", weight_op="body", channels=8,
    outputs=_fx_outputs, snapshot=lambda m: [(k, v.tolist()) for k, v in m.state_dict().items()],
    is_int8=_fx_is_int8, input_scale=_fx_input_scale, weight_scales=_fx_weight_scales,
)


# --- ONNX ------------------------------------------------------------------------------------------
D, H, K = 8, 16, 4


def tiny_model(opset: int = 17) -> onnx.ModelProto:
    """x [N, S, 8] -> MatMul -> Relu -> MatMul -> (b @ b^T) @ b ; x^T -> Conv1d -> mean -> Gemm."""
    rng = np.random.default_rng(0)

    def w(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32) * 0.5, name)

    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["a"], name="m1"),
        helper.make_node("Relu", ["a"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "W2"], ["b"], name="m2"),
        helper.make_node("Transpose", ["b"], ["bt"], name="t1", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["b", "bt"], ["s"], name="scores"),
        helper.make_node("MatMul", ["s", "b"], ["y"], name="mix"),
        helper.make_node("Transpose", ["x"], ["xt"], name="t2", perm=[0, 2, 1]),
        helper.make_node("Conv", ["xt", "WC", "BC"], ["c"], name="conv", pads=[1, 1], kernel_shape=[3]),
        helper.make_node("ReduceMean", ["c"], ["p"], name="pool", axes=[2], keepdims=0),
        helper.make_node("Gemm", ["p", "WG", "BG"], ["g"], name="gemm"),
    ]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "S", D])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "S", D]),
         helper.make_tensor_value_info("g", TensorProto.FLOAT, ["N", K])],
        [w("W1", D, H), w("W2", H, D), w("WC", D, D, 3), w("BC", D), w("WG", D, K), w("BG", K)],
    )
    if opset >= 18:
        raise ValueError("ReduceMean takes axes as an input from opset 18")
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def onnx_batches(n: int = 6, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((2, 5 + 3 * i, D)).astype(np.float32)} for i in range(n)]  # lengths vary


def _onnx_model() -> onnx.ModelProto:
    """tiny_model plus a Conv whose weight is a model input: no INT8 kernel takes it."""
    model = tiny_model()
    model.graph.node.append(helper.make_node("Conv", ["xt", "wc"], ["c2"], name="conv_of_input", kernel_shape=[3]))
    model.graph.input.append(helper.make_tensor_value_info("wc", TensorProto.FLOAT, [D, D, 3]))
    model.graph.output.append(helper.make_tensor_value_info("c2", TensorProto.FLOAT, ["N", D, "S2"]))
    return model


def _onnx_batches() -> list[dict[str, np.ndarray]]:
    data = onnx_batches(3)
    wc = np.random.default_rng(2).standard_normal((D, D, 3)).astype(np.float32)
    data[0]["x"][0, 0, 0] = OUTLIER
    return [{**b, "wc": wc} for b in data]


def _onnx_outputs(model: ORTSession | onnx.ModelProto, batch: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ORTSession(model) if isinstance(model, onnx.ModelProto) else model
    return session.run(None, batch)


def _input_dq(model: ORTSession, op: str, index: int) -> onnx.NodeProto | None:
    """The DequantizeLinear feeding input ``index`` of node ``op``, if any."""
    graph = model.model_proto.graph
    node = next(n for n in graph.node if n.name == op)
    producer = next((p for p in graph.node if node.input[index] in p.output), None)
    return producer if producer is not None and producer.op_type == "DequantizeLinear" else None


def _onnx_is_int8(model: ORTSession, op: str) -> bool:
    """ORT fuses a node into an INT8 kernel when a DequantizeLinear feeds every input."""
    node = next(n for n in model.model_proto.graph.node if n.name == op)
    return all(_input_dq(model, op, i) is not None for i, name in enumerate(node.input) if name)


def _onnx_other() -> tuple[onnx.ModelProto, list[dict[str, np.ndarray]]]:
    """The first two MatMuls of tiny_model alone: other tensors."""
    model = tiny_model()
    keep = [n for n in model.graph.node if n.name in ("m1", "relu", "m2")]
    del model.graph.node[:], model.graph.output[:]
    model.graph.node.extend(keep)
    model.graph.output.append(helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", "S", D]))
    return model, onnx_batches(2)


def _dq_scale(model: ORTSession, op: str, index: int) -> np.ndarray:
    """The scale of the DequantizeLinear feeding input ``index`` of ``op``."""
    dq = _input_dq(model, op, index)
    assert dq is not None, f"input {index} of {op} is not quantized"
    return next(numpy_helper.to_array(i) for i in model.model_proto.graph.initializer if i.name == dq.input[1])


ONNX = Case(
    ONNXAdapter, _onnx_model, _onnx_batches, _onnx_other,
    bad_batch={"x": np.zeros((1, 4, 5), np.float32), "wc": np.zeros((D, D, 3), np.float32)},
    ops=("m1", "m2", "scores", "mix", "conv", "gemm"), unsupported=("conv_of_input",), input_op="m1",
    weight_op="m1", channels=H, outputs=_onnx_outputs, snapshot=lambda m: m.SerializeToString(),
    is_int8=_onnx_is_int8,
    input_scale=lambda m, op: float(_dq_scale(m, op, 0)), weight_scales=lambda m, op: _dq_scale(m, op, 1).size,
)


# --- the fake --------------------------------------------------------------------------------------
def _fake_is_int8(model: FakeModel, op: str) -> bool:
    return model.config is not None and op not in model.config.fp32_ops


FAKE = Case(
    FakeAdapter, lambda: fake_model(n_ops=3), lambda: [np.zeros(2)] * 3, lambda: (fake_model(n_ops=2), [None]),
    bad_batch=None, ops=("op0", "op1", "op2"), unsupported=(), input_op="op0", weight_op="op0", channels=1,
    outputs=lambda model, _batch: [np.array([model.accuracy()])],
    snapshot=lambda m: json.dumps([m.sensitivity, m.baseline, m.calibration_helps, repr(m.config)]),
    is_int8=_fake_is_int8,
    lacks={name: f"the fake adapter {reason} (its strategy tests need none)" for name, reason in {
        "stats": "keeps no activation statistics", "weights": "has no weights",
        "batches": "runs no model on its batches"}.items()},
)

CASES = {"fx": FX, "onnx": ONNX, "fake": FAKE}
