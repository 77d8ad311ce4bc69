"""One FX graph per unit in which every convolution and linear is a plain torch.nn module.

torch.ao matches modules by exact type: a conv written as an ``nn.Conv2d`` subclass with its own
``forward`` (explicit padding, then ``F.conv2d``), or a bare ``F.linear`` on a parameter, would be
quantized as an unnamed function and never fused with its BatchNorm (issue 14: 49 BatchNorms
quantized one by one, INT8 4-6x slower than FP32). So we trace through such modules and turn each
``F.conv*``/``F.linear`` whose weight is a parameter back into a plain module at the path of the
module that owns the weight. A zero padding in front of a convolution is folded into the
convolution when it is symmetric; an asymmetric one stays an explicit ``F.pad``.

A conv subclass whose ``forward`` FX cannot trace (TensorFlow "same" padding computed from the
input's shape) is run once on its real input while its torch calls are recorded; when it is just a
padding and a convolution of its own weight, it is traced as that padding (specialised to the input
size seen) and a plain convolution.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch import fx, nn
from torch.ao.nn.intrinsic import _FusedModule
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

FUNCTIONAL_CONV = (F.conv1d, F.conv2d, F.conv3d)
FUNCTIONAL_MODULES = {F.conv1d: nn.Conv1d, F.conv2d: nn.Conv2d, F.conv3d: nn.Conv3d, F.linear: nn.Linear}
WEIGHTED = (nn.Linear, nn.modules.conv._ConvNd)
# Positional parameter names (their schemas are ambiguous to torch.fx's normalize_function).
CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
LINEAR_ARGS = ("input", "weight", "bias")
PAD_ARGS = ("input", "pad", "mode", "value")


class Tracer(fx.Tracer):
    """Leaves are the childless torch.nn modules used as they are; everything else is traced
    through, so containers such as ``nn.TransformerEncoder`` and subclasses of ``nn.Conv2d`` with
    their own ``forward`` open up into their ops. ``recorded`` modules are leaves, replaced later."""

    def __init__(self, recorded: dict[int, list] | None = None) -> None:
        super().__init__()
        self.recorded = recorded or {}

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, _FusedModule) or id(m) in self.recorded:
            return True
        own_forward = type(m).forward is not getattr(_torch_base(type(m)), "forward", None)
        return type(m).__module__.startswith(("torch.nn", "torch.ao.nn")) and not own_forward and not list(m.children())


def _torch_base(cls: type) -> type:
    """The nearest torch.nn class in ``cls``'s ancestry (``cls`` itself when it is one)."""
    return next(c for c in cls.__mro__ if c.__module__.startswith(("torch.nn", "torch.ao.nn")))


def trace(module: nn.Module, concrete_args: dict | None = None,
          recorded: dict[int, list] | None = None, tracer: Tracer | None = None) -> fx.GraphModule:
    """``module`` traced with its functional convolutions and linears as named modules.

    ``recorded``: the padding and convolution calls (``record``) of conv subclasses, by module id.
    ``tracer``: a ``Tracer`` to use instead of a new one (``fx_shapes.ShapeTracer``)."""
    tracer = tracer or Tracer(recorded)
    graph = tracer.trace(module, concrete_args or None)
    gm = fx.GraphModule(tracer.root, graph, type(module).__name__)
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and id(module.get_submodule(str(node.target))) in tracer.recorded:
            _replay(gm, node, tracer.recorded[id(module.get_submodule(str(node.target)))])
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in FUNCTIONAL_MODULES:
            _to_module(gm, module, node)
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and isinstance(getattr(gm.get_submodule(str(node.target)), "padding", 0), str):
            _numeric_padding(gm, node)
    calls = Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_module")
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and calls[str(node.target)] == 1:
            _fold_pad_into_module(gm, node)
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


def restore_output_class(gm: fx.GraphModule, output_class: type) -> None:
    """Rebuild a dict output as ``output_class`` (FX flattens dict subclasses to plain dicts)."""
    output = next(n for n in gm.graph.nodes if n.op == "output")
    value = output.args[0]
    if not (isinstance(value, dict) and issubclass(output_class, dict) and output_class is not dict):
        return
    with gm.graph.inserting_before(output):
        rebuilt = gm.graph.call_function(output_class, (), dict(value))
    output.args = (rebuilt,)
    gm.recompile()


class _Recorder(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[Any, tuple, dict]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", None) not in ("__get__", "size", "dim"):  # shape reads
            self.calls.append((func, args, kwargs))
        return func(*args, **kwargs)


def record(module: nn.Module, example: tuple[tuple, dict]) -> list | None:
    """The (pad, conv) calls of a conv subclass's ``forward`` on ``example``; None when its forward
    does anything else (then it is traced through as usual)."""
    if not isinstance(module, nn.modules.conv._ConvNd) or type(module).__module__.startswith("torch.nn"):
        return None
    args, kwargs = example
    if len(args) != 1 or kwargs or not isinstance(args[0], torch.Tensor):
        return None
    recorder = _Recorder()
    with torch.inference_mode(), recorder:
        module(*args)
    funcs = [func for func, _, _ in recorder.calls]
    conv = FUNCTIONAL_CONV[module.weight.dim() - 3]
    if funcs not in ([F.pad, conv], [conv]):
        return None
    conv_call = _arguments_of(recorder.calls[-1], CONV_ARGS)
    if conv_call["weight"] is not module.weight or conv_call.get("bias") is not module.bias:
        return None
    # keep the constants only (not the activations)
    return [(func, {k: v for k, v in _arguments_of(call, names).items() if not isinstance(v, torch.Tensor)})
            for call, func, names in zip(recorder.calls, funcs, (PAD_ARGS, CONV_ARGS)[2 - len(funcs):], strict=True)]


def _replay(gm: fx.GraphModule, node: fx.Node, calls: list) -> None:
    """Replace the call of a recorded conv subclass by its padding and a functional conv."""
    source = node.args[0]
    with gm.graph.inserting_before(node):
        if len(calls) == 2:
            pad = calls[0][1]
            source = gm.graph.call_function(F.pad, (source, tuple(pad["pad"])),
                                            {k: pad[k] for k in ("mode", "value") if k in pad})
        conv = calls[-1][1]
        weight = gm.graph.get_attr(f"{node.target}.weight")
        has_bias = getattr(gm.get_submodule(str(node.target)), "bias", None) is not None
        bias = gm.graph.get_attr(f"{node.target}.bias") if has_bias else None
        replacement = gm.graph.call_function(calls[-1][0], (source, weight, bias), conv)
    node.replace_all_uses_with(replacement)
    gm.graph.erase_node(node)


def _arguments_of(call: tuple[Any, tuple, dict], names: tuple[str, ...]) -> dict:
    _, args, kwargs = call
    return {**dict(zip(names, args, strict=False)), **kwargs}


def _to_module(gm: fx.GraphModule, original: nn.Module, node: fx.Node) -> None:
    kwargs = _arguments(node, LINEAR_ARGS if node.target is F.linear else CONV_ARGS)
    weight, bias = kwargs.pop("weight"), kwargs.pop("bias", None)
    if not _is_parameter(gm, weight) or (bias is not None and not _is_parameter(gm, bias)):
        return  # a weight computed at run time: no module can hold it
    if any(isinstance(v, fx.Node) for k, v in kwargs.items() if k != "input"):
        return  # stride/padding computed at run time
    source = kwargs.pop("input")
    padding = kwargs.pop("padding", 0)
    source, padding = _fold_zero_pad(source, padding, node.target)
    if isinstance(padding, str):
        source, padding = _explicit_padding(gm, node, source, padding, tuple(gm.get_parameter(weight.target).shape[2:]),
                                            kwargs.get("dilation", 1))
    module = plain_module(node.target, gm.get_parameter(weight.target),
                          None if bias is None else gm.get_parameter(bias.target), padding, kwargs)
    path = _module_path(gm, original, weight.target, node.target)
    gm.add_submodule(path, module.train(original.training))
    with gm.graph.inserting_before(node):
        replacement = gm.graph.call_module(path, (source,))
    node.replace_all_uses_with(replacement)
    gm.graph.erase_node(node)


def _arguments(node: fx.Node, names: tuple[str, ...]) -> dict:
    return {**dict(zip(names, node.args, strict=False)), **node.kwargs}


def _explicit_padding(gm: fx.GraphModule, node: fx.Node, source, padding: str, kernel: tuple, dilation):
    """(input, padding) for a conv given "valid"/"same": quantized convs take numbers only. An
    uneven "same" padding (even kernel) becomes an explicit ``F.pad`` in front, as torch pads it."""
    if padding == "valid":
        return source, 0
    dilation = (dilation,) * len(kernel) if isinstance(dilation, int) else tuple(dilation)
    totals = [d * (k - 1) for k, d in zip(kernel, dilation, strict=True)]
    if all(t % 2 == 0 for t in totals):
        return source, tuple(t // 2 for t in totals)
    pads = []
    for total in reversed(totals):  # F.pad lists the last dimension first
        pads += [total // 2, total - total // 2]
    with gm.graph.inserting_before(node):
        return gm.graph.call_function(F.pad, (source, tuple(pads))), 0


def _numeric_padding(gm: fx.GraphModule, node: fx.Node) -> None:
    """A torch.nn conv module with "same"/"valid" padding replaced by one with numbers."""
    conv: Any = gm.get_submodule(str(node.target))
    if conv.padding_mode != "zeros":
        return
    source, padding = _explicit_padding(gm, node, node.args[0], conv.padding, conv.kernel_size, conv.dilation)
    module = plain_module(FUNCTIONAL_CONV[conv.weight.dim() - 3], conv.weight, conv.bias, padding,
                          {"stride": conv.stride, "dilation": conv.dilation, "groups": conv.groups})
    gm.add_submodule(str(node.target), module.train(conv.training))
    node.args = (source, *node.args[1:])


def _fold_pad_into_module(gm: fx.GraphModule, node: fx.Node) -> None:
    """A symmetric zero ``F.pad`` in front of an unpadded torch.nn conv module becomes its padding
    (Hugging Face's TF-style padding, specialised to the input size: ``fx_shapes``)."""
    conv: Any = gm.get_submodule(str(node.target))
    if type(conv) not in (nn.Conv1d, nn.Conv2d, nn.Conv3d) or conv.padding_mode != "zeros" or any(conv.padding):
        return
    function = FUNCTIONAL_CONV[conv.weight.dim() - 3]
    source, padding = _fold_zero_pad(node.args[0], 0, function)
    if source is node.args[0]:
        return
    module = plain_module(function, conv.weight, conv.bias, padding,
                          {"stride": conv.stride, "dilation": conv.dilation, "groups": conv.groups})
    gm.add_submodule(str(node.target), module.train(conv.training))
    node.args = (source, *node.args[1:])


def plain_module(function, weight: nn.Parameter, bias: nn.Parameter | None, padding, kwargs) -> nn.Module:
    cls = FUNCTIONAL_MODULES[function]
    with torch.device("meta"):  # the parameters are the model's own: nothing to initialise
        if cls is nn.Linear:
            module = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        else:
            groups = kwargs.get("groups", 1)
            module = cls(weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]),
                         stride=kwargs.get("stride", 1), padding=padding, dilation=kwargs.get("dilation", 1),
                         groups=groups, bias=bias is not None)
    module.weight = weight
    if bias is not None:
        module.bias = bias
    return module


def _fold_zero_pad(source, padding, function):
    """(input, padding) with a symmetric constant-zero ``F.pad`` in front of a conv folded in."""
    if function is F.linear or padding not in (0, (0,), (0, 0), (0, 0, 0)):
        return source, padding
    pad = zero_pad_amounts(source)
    dims = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}[function]
    if (pad is None or len(pad) != 2 * dims or any(pad[i] != pad[i + 1] for i in range(0, len(pad), 2))
            or len(source.users) != 1):
        return source, padding
    # F.pad lists the last dimension first; conv padding lists the first spatial dimension first
    return _arguments(source, PAD_ARGS)["input"], tuple(pad[i] for i in range(2 * dims - 2, -1, -2))


def zero_pad_amounts(node) -> list | None:
    """The amounts (last dimension first) of a constant-zero ``F.pad`` call; None for anything else."""
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target is F.pad):
        return None
    call = _arguments(node, PAD_ARGS)
    pad, mode, value = call["pad"], call.get("mode", "constant"), call.get("value")
    if mode != "constant" or value not in (None, 0, 0.0) or not isinstance(pad, (list, tuple)):
        return None
    return list(pad)


def _is_parameter(gm: fx.GraphModule, node) -> bool:
    if not (isinstance(node, fx.Node) and node.op == "get_attr"):
        return False
    try:
        return isinstance(gm.get_parameter(str(node.target)), nn.Parameter)
    except AttributeError:
        return False


def _module_path(gm: fx.GraphModule, original: nn.Module, weight_path: str, function) -> str:
    """The owning module's path when it is a conv/linear (subclass); else a child named after the op."""
    owner, _, _ = weight_path.rpartition(".")
    try:
        owner_module = original.get_submodule(owner)
    except AttributeError:
        owner_module = None
    if isinstance(owner_module, WEIGHTED):
        return owner
    base = f"{owner}.{function.__name__}" if owner else function.__name__
    path, n = base, 1
    while _has_submodule(gm, path):
        path, n = f"{base}_{n}", n + 1
    return path


def _has_submodule(gm: fx.GraphModule, path: str) -> bool:
    try:
        gm.get_submodule(path)
        return True
    except AttributeError:
        return False
