"""Asymmetric zero padding before a depthwise convolution, re-aligned onto x86's fast INT8 path.

TensorFlow's "same" padding at stride 2 pads one more on the far side (EfficientNet, MobileNetV2 in
Hugging Face, timm's ``Conv2dSame``): an ``F.pad`` then an unpadded conv. x86's INT8 depthwise
kernel (fbgemm, for more than 100 channels) has a fast path only for a conv padded by k//2 on
each side; unpadded on a padded input it takes a generic path, measured here (8 x 144 x 56 x 56,
5x5, stride 2, no AMX) at 201 ms against 1.0 ms on the fast path and 2.8 ms in FP32.

So such a conv is rewritten to pad k//2 itself: the input is padded (a, b) first so that its
windows start ``c`` strides later than TensorFlow's, and the ``c`` extra outputs at the start (and
any extra at the end) are cropped after the conv and the per-channel or elementwise ops that follow
it (BatchNorm, activations), so conv+BN+activation still fuse. Same function, one more row and
column of output computed and cropped.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from .fx_graph import plain_module, zero_pad_amounts

# ops that commute with a spatial crop, so the crop can follow them (conv+BN+activation stay fused)
_PER_POSITION = (nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.Hardswish, nn.SiLU, nn.Identity, nn.Dropout)
_FAST_KERNELS = (3, 5, 7)


def same_padded_depthwise(gm: fx.GraphModule, example: tuple[tuple, dict]) -> fx.GraphModule:
    """``gm`` with each zero padding (``F.pad``, ``ZeroPad2d``) + unpadded depthwise ``nn.Conv2d`` re-aligned;
    ``example`` (args, kwargs) is run once to learn the padded tensors' sizes."""
    sizes = _pad_input_sizes(gm, example)
    changed = False
    for node in list(gm.graph.nodes):
        source = node.args[0] if node.args else None
        if node.op == "call_module" and isinstance(source, fx.Node) and source in sizes:
            changed |= _realign(gm, node, source, sizes[source])
    if changed:
        gm.graph.eliminate_dead_code()
        gm.delete_all_unused_submodules()
        gm.recompile()
    return gm


def _zero_pad(gm: fx.GraphModule, node: fx.Node) -> list[int] | None:
    """The amounts (F.pad's order) of a constant-zero 2D padding: an ``F.pad`` or a ``ZeroPad2d``
    (or zero ``ConstantPad2d``) module; None for anything else."""
    if node.op == "call_module" and isinstance(module := gm.get_submodule(str(node.target)), nn.ConstantPad2d):
        pad = list(module.padding) if module.value == 0 else None
    else:
        pad = zero_pad_amounts(node)
    if pad is None:
        return None
    return pad if len(pad) == 4 and all(isinstance(p, int) and p >= 0 for p in pad) else None


def _pad_input_sizes(gm: fx.GraphModule, example: tuple[tuple, dict]) -> dict[fx.Node, tuple[int, int]]:
    """The spatial size of the input of every zero 2D padding (by the padding's node)."""
    pads = {n for n in gm.graph.nodes if _zero_pad(gm, n) is not None}
    if not pads:
        return {}
    sizes: dict[fx.Node, tuple[int, int]] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            source = self.env.get(n.args[0]) if n in pads and isinstance(n.args[0], fx.Node) else None
            if isinstance(source, torch.Tensor) and source.dim() == 4:
                sizes[n] = (source.shape[2], source.shape[3])
            return super().run_node(n)

    bound = inspect.signature(gm.forward).bind(*example[0], **example[1])
    bound.apply_defaults()
    with torch.no_grad():
        Recorder(gm).run(*bound.arguments.values())
    return sizes


def _realign(gm: fx.GraphModule, node: fx.Node, pad_node: fx.Node, size: tuple[int, int]) -> bool:
    conv: Any = gm.get_submodule(str(node.target))
    source, pad = pad_node.args[0], _zero_pad(gm, pad_node)
    if not (pad is not None and isinstance(source, fx.Node) and type(conv) is nn.Conv2d
            and conv.groups == conv.in_channels > 1 and conv.padding == (0, 0) and conv.padding_mode == "zeros"
            and conv.dilation == (1, 1) and len(pad_node.users) == 1
            and conv.kernel_size[0] == conv.kernel_size[1] in _FAST_KERNELS and set(conv.stride) <= {1, 2}):
        return False
    # per spatial dimension (height, width): F.pad lists width first
    plans = [_plan(n, k, s, before, after) for n, k, s, before, after in
             zip(size, conv.kernel_size, conv.stride, (pad[2], pad[0]), (pad[3], pad[1]), strict=True)]
    (a_h, b_h, c_h, e_h), (a_w, b_w, c_w, e_w) = plans
    padded_input = source
    if any((a_w, b_w, a_h, b_h)):  # a new F.pad: a padding module may be the model's own
        with gm.graph.inserting_before(node):
            padded_input = gm.graph.call_function(F.pad, (source, (a_w, b_w, a_h, b_h)))
    node.replace_input_with(pad_node, padded_input)
    same = (conv.kernel_size[0] // 2, conv.kernel_size[1] // 2)
    bias = None if conv.bias is None else conv.get_parameter("bias")
    padded = plain_module(F.conv2d, conv.get_parameter("weight"), bias, same,
                          {"stride": conv.stride, "groups": conv.groups})
    gm.add_submodule(str(node.target), padded.train(conv.training))
    if any((c_w, e_w, c_h, e_h)):
        last = _last_per_position(gm, node)
        with gm.graph.inserting_after(last):
            crop = gm.graph.call_function(F.pad, (last, (-c_w, -e_w, -c_h, -e_h)))
        last.replace_all_uses_with(crop, delete_user_cb=lambda user: user is not crop)
    return True


def _plan(n: int, k: int, s: int, before: int, after: int) -> tuple[int, int, int, int]:
    """(pad before, pad after, outputs cropped at the start, at the end) for a conv padding k//2
    on each side to compute what a conv with no padding computes on ``before``/``after`` padding."""
    p = k // 2
    crop_start = max(-(-(p - before) // s), 0)  # whole strides, so the windows stay aligned
    pad_before, pad_after = before + s * crop_start - p, max(after - p, 0)
    outputs = (n + pad_before + pad_after + 2 * p - k) // s + 1
    wanted = (n + before + after - k) // s + 1
    return pad_before, pad_after, crop_start, outputs - crop_start - wanted


def _last_per_position(gm: fx.GraphModule, node: fx.Node) -> fx.Node:
    """The last of the single-user chain of per-channel/elementwise modules after ``node``."""
    while len(node.users) == 1:
        user = next(iter(node.users))
        if not (user.op == "call_module" and isinstance(gm.get_submodule(str(user.target)), _PER_POSITION)
                and user.args and user.args[0] is node):
            break
        node = user
    return node
