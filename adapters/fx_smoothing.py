"""SmoothQuant in an FX unit: the math of autoquant.smoothing applied to static INT8 Linears.

The Linears that read one observed tensor form a group and share one per-input-channel scale
``s``. In a candidate their weights become ``W diag(s)`` (cached per alpha, so packed INT8
weights are reused across candidates) and the activation is divided by ``s`` by a multiply
inserted right before the quantize that feeds them: in the FX graph nothing earlier can absorb
it (BERT is post-LN, so the LayerNorm output also feeds a residual add that needs the unscaled
value, and a unit is a single Linear whenever FX cannot trace the layer around it). The smoothed
activation's range is min-max from the per-channel extremes of the one calibration pass, exact
for the smoothed tensor.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.ao.nn.quantized import LayerNorm as QuantizedLayerNorm

from autoquant.calibration import TensorStats
from autoquant.smoothing import smoothing_scales, weight_absmax


@dataclass(frozen=True)
class SmoothGroup:
    """Linear modules (``linears``, targets in the unit's graph) that read the tensor ``tensor``
    (the FX node name the calibration statistics are keyed by)."""

    tensor: str
    linears: tuple[str, ...]


def smoothing_groups(recording: fx.GraphModule, is_observer) -> list[SmoothGroup]:  # noqa: ANN001
    """Observed tensors read by Linears only, with those Linears, where the tensor is always float
    before its quantize (see ``_always_float``). An observer that also observes
    another tensor (a same-scale op such as flatten or max-pool shares its input's) keeps the
    statistics of that tensor, whose channels are not the Linear's: not smoothed."""
    observers = [n for n in recording.graph.nodes
                 if n.op == "call_module" and is_observer(recording.get_submodule(str(n.target)))]
    calls = Counter(id(recording.get_submodule(str(n.target))) for n in observers)  # shared under two names
    groups = []
    for node in observers:
        if calls[id(recording.get_submodule(str(node.target)))] > 1:
            continue
        users = list(node.users)
        if not _always_float(recording, node.args[0]):
            continue
        if users and all(u.op == "call_module" and type(recording.get_submodule(str(u.target))) is nn.Linear
                         and u.args[0] is node for u in users):
            groups.append(SmoothGroup(node.args[0].name, tuple(str(u.target) for u in users)))
    return groups


def _always_float(recording: fx.GraphModule, producer: object) -> bool:
    """The tensor reaches its Linears through a quantize in every candidate: a unit input or the
    output of an op with no INT8 kernel, or a LayerNorm (where its input is INT8, so is its
    output: the division is folded into its scale and shift). Another INT8 producer (a
    Linear+ReLU) hands over a tensor that is already quantized, with no quantize to put the
    division before."""
    if not isinstance(producer, fx.Node):
        return False
    if producer.op == "placeholder":
        return True
    if producer.op == "call_module":
        return isinstance(recording.get_submodule(str(producer.target)), _FLOAT_MODULES)
    return producer.op == "call_function" and producer.target in _FLOAT_FUNCTIONS


_FLOAT_MODULES = (nn.LayerNorm, nn.GELU)
_FLOAT_FUNCTIONS = (torch.nn.functional.layer_norm, torch.nn.functional.gelu)


class Smoother:
    """Smoothed weights and scales per (unit, group, alpha), computed once from the statistics."""

    def __init__(self) -> None:
        self._cache: dict[tuple, tuple[torch.Tensor, dict[str, nn.Parameter]]] = {}

    def scales(self, key: tuple, stats: TensorStats, linears: dict[str, nn.Linear],
               alpha: float) -> tuple[torch.Tensor, dict[str, nn.Parameter]]:
        """(1 / s, the smoothed weight of each Linear)."""
        if key not in self._cache:
            absmax = stats.channel_absmax
            if absmax is None:
                raise ValueError(f"no per-channel statistics for {key[0]} (an autoquant bug: report it)")
            weights = {t: m.weight.detach().float().numpy() for t, m in linears.items()}
            s = smoothing_scales(absmax, weight_absmax(list(weights.values()), in_axis=1), alpha)
            smoothed = {t: nn.Parameter(torch.from_numpy(w * s[None, :]).to(linears[t].weight.dtype),
                                        requires_grad=False) for t, w in weights.items()}
            self._cache[key] = (torch.from_numpy(1.0 / s), smoothed)
        return self._cache[key]


def divide_inputs(converted: fx.GraphModule, linears: tuple[str, ...], inverse: torch.Tensor, name: str) -> None:
    """Divide the input of ``linears`` by ``s``: multiply the input of the quantize that feeds them
    by ``inverse`` (1 / s), or, where an INT8 LayerNorm feeds only them (its input was INT8: a
    pre-LN transformer's residual stream), fold ``inverse`` into its scale and shift."""
    graph = converted.graph
    quantizes = {n.args[0] for n in graph.nodes if n.op == "call_module" and n.target in linears}
    converted.register_buffer(name, inverse)
    for quantize in quantizes:
        if _fold_into_layer_norm(converted, quantize, linears, inverse):
            continue
        if not (isinstance(quantize, fx.Node) and quantize.target is torch.quantize_per_tensor):
            raise ValueError(f"expected a quantize_per_tensor before {linears}, found {quantize}")
        with graph.inserting_before(quantize):
            scaled = graph.call_function(torch.mul, (quantize.args[0], graph.get_attr(name)))
        quantize.args = (scaled, *quantize.args[1:])
    graph.lint()
    converted.recompile()


def _fold_into_layer_norm(converted: fx.GraphModule, node: object, linears: tuple[str, ...],
                          inverse: torch.Tensor) -> bool:
    """Scale the affine of an INT8 LayerNorm that feeds only ``linears`` by ``inverse`` (new
    parameters: the float model's are shared); its output range is already the smoothed one."""
    if not (isinstance(node, fx.Node) and node.op == "call_module"):
        return False
    norm = converted.get_submodule(str(node.target))
    if not (isinstance(norm, QuantizedLayerNorm) and all(u.target in linears for u in node.users)):
        return False
    weight = norm.weight.detach() if norm.weight is not None else torch.ones_like(inverse)
    norm.weight = nn.Parameter(weight * inverse.to(weight.dtype), requires_grad=False)
    if norm.bias is not None:
        norm.bias = nn.Parameter(norm.bias.detach() * inverse.to(norm.bias.dtype), requires_grad=False)
    return True
