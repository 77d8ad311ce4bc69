"""Lowering details of ``convert_fx``: packed INT8 weights reused across candidates, padding on INT8 tensors.

Weight prepacking is 70% of a ``convert_fx`` (1.4 of 2.0 s on a 44-conv EfficientNet-like net at
224x224: each ``nnq.Conv2d`` packs a dummy weight in its constructor, then the real one). A
candidate changes which ops run INT8 and the activation ranges, never a weight, so the packed
module of a weight is built once and each candidate gets a shallow copy carrying its own output
scale and zero point. torch's lowering picks the quantized class from two tables; within
``reusing_packed_weights`` those tables hand out caching stand-ins for the classes.

Only the output probe's models share them (``FXAdapter.build_for_outputs``): a oneDNN packed conv
caches one primitive, for the input shape and thread count of its first run, and runs slower on
others, so a model that is timed or returned packs its own weights.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from unittest import mock

import torch
from torch import fx, nn
from torch.ao.quantization.fx import _lower_to_native_backend as lowering
from torch.nn import functional as F


class PackedWeights:
    """Quantized weighted modules keyed by the float weight they were made from."""

    def __init__(self) -> None:
        # key -> (weight kept alive so its address is never reused, quantized module)
        self._modules: dict[tuple, tuple[torch.Tensor, Any]] = {}

    def lower(self, q_class: Any, ref_module: nn.Module, scale: Any, zero_point: Any) -> nn.Module:
        inner: Any = ref_module[0] if isinstance(ref_module, nn.Sequential) else ref_module
        weight, bias = inner.weight, getattr(inner, "bias", None)
        key = (q_class, weight.untyped_storage().data_ptr(), tuple(weight.shape), inner.weight_qscheme,
               None if bias is None else bias.untyped_storage().data_ptr())
        if key not in self._modules:
            self._modules[key] = (weight, q_class.from_reference(ref_module, scale, zero_point))
        module: Any = _shallow_copy(self._modules[key][1])
        module.scale, module.zero_point = float(scale), int(zero_point)
        return module


def _shallow_copy(module: nn.Module) -> nn.Module:
    """A module sharing the packed weight (``copy.copy`` would unpack and repack it via __setstate__)."""
    clone = type(module).__new__(type(module))
    clone.__dict__ = {k: dict(v) if isinstance(v, dict) else v for k, v in module.__dict__.items()}
    return clone


class _Lowered:
    """Stands in for a quantized class in torch's lowering tables."""

    def __init__(self, q_class: type, cache: PackedWeights) -> None:
        self.q_class, self.cache = q_class, cache

    def from_reference(self, ref_module: nn.Module, scale: Any, zero_point: Any) -> nn.Module:
        return self.cache.lower(self.q_class, ref_module, scale, zero_point)


@contextmanager
def reusing_packed_weights(cache: PackedWeights) -> Iterator[None]:
    single = {ref: _Lowered(q, cache) for ref, q in lowering.STATIC_LOWER_MODULE_MAP.items()}
    fused = {ref: (inner, _Lowered(q, cache)) for ref, (inner, q) in lowering.STATIC_LOWER_FUSED_MODULE_MAP.items()}
    with mock.patch.dict(lowering.STATIC_LOWER_MODULE_MAP, single), \
            mock.patch.dict(lowering.STATIC_LOWER_FUSED_MODULE_MAP, fused):
        yield


def int8_padding(gm: fx.GraphModule) -> None:
    """``dequantize -> F.pad -> quantize`` lowered to ``F.pad`` on the INT8 tensor.

    torch pads a quantized tensor with the real value (0 becomes the zero point), and the padding
    shares its input's observer (``fx._backend_config``), so the quantize after it has its input's
    scale: as torch's own lowering does for the ops it knows to copy values (max-pool, flatten).
    Without this, each TF-style padding before a strided conv costs a float round trip."""
    changed = False
    for node in list(gm.graph.nodes):
        pad = node.args[0] if node.target is torch.quantize_per_tensor else None
        if not (isinstance(pad, fx.Node) and pad.target is F.pad and len(pad.users) == 1):
            continue
        dequantized = pad.args[0]
        if not (isinstance(dequantized, fx.Node) and dequantized.op == "call_method"
                and dequantized.target == "dequantize" and len(dequantized.users) == 1):
            continue
        int8 = dequantized.args[0]
        if not isinstance(int8, fx.Node):
            continue
        pad.replace_input_with(dequantized, int8)
        node.replace_all_uses_with(pad)
        gm.graph.erase_node(node)
        gm.graph.erase_node(dequantized)
        changed = True
    if changed:
        gm.graph.eliminate_dead_code()
        gm.recompile()
