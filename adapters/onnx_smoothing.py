"""SmoothQuant on an ONNX graph: the math of autoquant.smoothing applied to weight MatMuls.

The weight MatMuls that read the same activation form a group (BERT's query, key and value read
one LayerNorm output) and share one per-channel scale ``s``. Their weights become
``diag(s) W`` (new initializers, named per alpha, so cached weight quantization parameters never
mix), and the activation is divided by ``s``: folded into the producer when it is a
LayerNormalization read by the group alone, else by a Mul with ``1 / s`` placed before the group
(BERT is post-LN: every LayerNorm output also feeds a residual Add, which must keep the unscaled
value). The smoothed activation's range is min-max from the per-channel extremes of the one
calibration pass, exact for the new tensor: smoothing removes the outliers the clipping methods
exist for.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from autoquant.calibration import TensorStats
from autoquant.smoothing import fold_into_norm, fold_into_weight, smoothed_range, smoothing_scales, weight_absmax

SMOOTHED = "_smoothed"  # suffix of the Mul output that carries the smoothed activation


@dataclass(frozen=True)
class SmoothGroup:
    """Weight MatMuls (``matmuls``, node names) that read ``activation`` with weights ``weights``."""

    activation: str
    matmuls: tuple[str, ...]
    weights: tuple[str, ...]


def smoothing_groups(model: onnx.ModelProto) -> list[SmoothGroup]:
    """The weight MatMuls (2-D constant weight as second input) grouped by the activation they read."""
    initializers = {i.name: i for i in model.graph.initializer}
    groups: dict[str, list[tuple[str, str]]] = {}
    for node in model.graph.node:
        if node.op_type != "MatMul" or node.input[0] in initializers:
            continue
        weight = initializers.get(node.input[1])
        if weight is not None and len(weight.dims) == 2:
            groups.setdefault(node.input[0], []).append((node.name, node.input[1]))
    return [SmoothGroup(act, tuple(n for n, _ in members), tuple(w for _, w in members))
            for act, members in groups.items()]


def smooth(model: onnx.ModelProto, groups: list[SmoothGroup], stats: dict[str, TensorStats], alpha: float,
           symmetric: bool) -> tuple[onnx.ModelProto, dict[str, tuple[float, float]]]:
    """A smoothed copy of ``model``, and the (lo, hi) range of each smoothed activation tensor."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    weights = {i.name: i for i in graph.initializer}
    nodes = {n.name: n for n in graph.node}
    ranges, muls = {}, {}
    for group in groups:
        act_absmax = stats[group.activation].channel_absmax
        assert act_absmax is not None  # calibrated with channels=True
        s = smoothing_scales(act_absmax, weight_absmax(
            [numpy_helper.to_array(weights[w]) for w in group.weights], in_axis=0), alpha)
        for matmul, name in zip(group.matmuls, group.weights, strict=True):
            smoothed = f"{name}_smooth{alpha:g}"
            graph.initializer.append(numpy_helper.from_array(
                fold_into_weight(numpy_helper.to_array(weights[name]), s, in_axis=0), smoothed))
            nodes[matmul].input[1] = smoothed
        tensor, mul = _divide(graph, group, s, alpha, nodes, weights)
        if mul is not None:
            muls.update(dict.fromkeys(group.matmuls, mul))
        ranges[tensor] = smoothed_range(stats[group.activation], 1.0 / s.astype(np.float64), symmetric)
    if muls:  # each Mul goes right before the first MatMul of its group (topological order holds)
        ordered, placed = [], set()
        for node in graph.node:
            mul = muls.get(node.name)
            if mul is not None and mul.name not in placed:
                ordered.append(mul)
                placed.add(mul.name)
            ordered.append(node)
        del graph.node[:]
        graph.node.extend(ordered)
    return model, ranges


def _divide(graph: onnx.GraphProto, group: SmoothGroup, s: np.ndarray, alpha: float, nodes: dict,
            weights: dict) -> tuple[str, onnx.NodeProto | None]:
    """Divide the group's activation by ``s``: the tensor that now holds the smoothed value, and
    the Mul node to insert before the group (None when folded into a LayerNorm)."""
    act = group.activation
    readers = [n for n in graph.node if act in n.input]
    producer = next((n for n in graph.node if act in n.output), None)
    if (producer is not None and producer.op_type == "LayerNormalization"
            and {n.name for n in readers} == set(group.matmuls) and act not in {o.name for o in graph.output}):
        gamma = numpy_helper.to_array(weights[producer.input[1]])
        beta = numpy_helper.to_array(weights[producer.input[2]]) if len(producer.input) > 2 else None
        gamma, beta = fold_into_norm(gamma, beta, s)
        for index, value in ((1, gamma), (2, beta)):
            if value is not None:
                name = f"{producer.input[index]}_smooth{alpha:g}_{act}"
                graph.initializer.append(numpy_helper.from_array(value, name))
                producer.input[index] = name
        return act, None
    smoothed = act + SMOOTHED
    inverse = f"{act}_smooth{alpha:g}_inverse"
    graph.initializer.append(numpy_helper.from_array((1.0 / s).astype(np.float32), inverse))
    mul = onnx.helper.make_node("Mul", [act, inverse], [smoothed], name=f"{act}_smooth_mul")
    for matmul in group.matmuls:
        nodes[matmul].input[0] = smoothed
    shape = next((vi for vi in graph.value_info if vi.name == act), None)
    info = onnx.helper.make_tensor_value_info(smoothed, TensorProto.FLOAT, None)
    if shape is not None:
        info.type.CopyFrom(shape.type)
    graph.value_info.append(info)
    return smoothed, mul
