"""Rewrite a traced graph into equivalent ops that have fast INT8 kernels on x86.

Measured at 224x224 (8x96x112x112, channels-last quint8 against FP32 NCHW, interleaved ratios):

- ``x.mean((2, 3), keepdim=True)`` (squeeze-and-excitation's squeeze): the quantized ``mean`` runs
  4.8x slower than FP32; ``adaptive_avg_pool2d(x, 1)``, the same values, runs at 1.0x.
- ``SiLU`` has no INT8 kernel, so FX leaves it in float between dequantize and quantize (2.3x FP32);
  written as ``x * sigmoid(x)`` it runs on quantized sigmoid and mul (0.64x).
- A layer scale (ConvNeXt's ``gamma * pwconv2(x)``, a per-output-channel parameter) is a quantized
  ``mul`` with a broadcast tensor: 4.6x slower than FP32's on ConvNeXt. Folded into the Linear's (or
  conv's) weight and bias, it costs nothing.

Without these, EfficientNet-style nets ran slower in full INT8 than in FP32 (issue 14).
"""

from __future__ import annotations

import functools
import operator
from copy import deepcopy

import torch
import torch.nn.functional as F
from torch import fx, nn

_SPATIAL = ({2, 3}, {-2, -1})


def int8_friendly(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm`` with spatial means as average pooling, SiLU as ``x * sigmoid(x)`` and layer scales
    folded into the Linear or conv before them, recompiled."""
    changed = False
    for node in list(gm.graph.nodes):
        if _fold_layer_scale(gm, node):
            changed = True
        elif _is_spatial_mean(node):
            with gm.graph.inserting_before(node):
                pooled = gm.graph.call_function(F.adaptive_avg_pool2d, (node.args[0], 1))
            _replace(node, pooled)
            changed = True
        elif _is_silu(gm, node):
            x = node.args[0]
            with gm.graph.inserting_before(node):
                gate = gm.graph.call_function(torch.sigmoid, (x,))
                product = gm.graph.call_function(operator.mul, (x, gate))
            _replace(node, product)
            changed = True
    if changed:
        gm.graph.eliminate_dead_code()
        gm.delete_all_unused_submodules()
        gm.recompile()
    return gm


def _replace(node: fx.Node, new: fx.Node) -> None:
    node.replace_all_uses_with(new)
    node.graph.erase_node(node)


def _is_spatial_mean(node: fx.Node) -> bool:
    is_mean = (node.op == "call_method" and node.target == "mean") or \
              (node.op == "call_function" and node.target is torch.mean)
    if not is_mean or len(node.args) < 2 and "dim" not in node.kwargs:
        return False
    dims = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    keepdim = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
    # over the last two dims of a 4-D (or 3-D) tensor, keeping them: exactly a 1x1 adaptive average pool
    return keepdim is True and isinstance(dims, (tuple, list)) and set(dims) in _SPATIAL and \
        not node.kwargs.get("dtype")


def _is_silu(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target is F.silu and not node.kwargs.get("inplace") and len(node.args) == 1
    if node.op != "call_module":
        return False
    module = gm.get_submodule(str(node.target))
    return type(module) is nn.SiLU and not module.inplace  # in place, other users of x see the change


def _fold_layer_scale(gm: fx.GraphModule, node: fx.Node) -> bool:
    """``layer(x) * gamma`` -> ``layer'(x)``, with ``gamma`` (one value per output channel) folded into
    a new copy of the Linear or conv (the model's own is not touched). False if ``node`` is not one."""
    if node.op != "call_function" or node.target not in (operator.mul, torch.mul) or len(node.args) != 2 or node.kwargs:
        return False
    for producer, scale in (node.args, node.args[::-1]):
        if not (isinstance(producer, fx.Node) and isinstance(scale, fx.Node) and producer.op == "call_module"
                and scale.op == "get_attr" and len(producer.users) == 1):
            continue
        layer = gm.get_submodule(str(producer.target))
        gamma = functools.reduce(getattr, str(scale.target).split("."), gm)
        folded = _scaled_copy(layer, gamma) if isinstance(gamma, torch.Tensor) else None
        if folded is not None:
            gm.add_submodule(str(producer.target), folded)
            _replace(node, producer)
            return True
    return False


def _scaled_copy(layer: nn.Module, gamma: torch.Tensor) -> nn.Module | None:
    """A copy of a plain Linear or conv whose outputs are scaled per channel by ``gamma``; None if
    ``gamma`` does not broadcast as one value per output channel of ``layer``."""
    if type(layer) not in (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d):
        return None
    weight: torch.Tensor = layer.get_parameter("weight")
    channels = weight.shape[0]
    # a Linear's channels are its output's last dim; a conv's its dim 1 (C, 1, 1 broadcasts there)
    shape = (channels,) if type(layer) is nn.Linear else (channels, *[1] * (weight.dim() - 2))
    if tuple(gamma.shape) not in (shape, (1, *shape)) or not gamma.is_floating_point():
        return None
    per_channel = gamma.detach().reshape(channels).to(weight.dtype)
    copy = deepcopy(layer)  # new parameters: the model's layer keeps its weights
    with torch.no_grad():
        copy.get_parameter("weight").mul_(per_channel.reshape(channels, *[1] * (weight.dim() - 1)))
        if copy.bias is not None:
            copy.get_parameter("bias").mul_(per_channel)
    return copy
