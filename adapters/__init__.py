"""Backends: each adapter quantizes one kind of model on one real runtime."""

from __future__ import annotations

import importlib
import os
from typing import Any

from autoquant.errors import ConfigError, check_choice

from .base import Adapter

# name -> "module:class", imported on use so that a missing backend costs nothing until needed.
ADAPTERS = {"fx": "autoquant.adapters.fx:FXAdapter", "onnx": "autoquant.adapters.onnx:ONNXAdapter"}


def adapter_class(name: str) -> type[Adapter]:
    module, cls = ADAPTERS[check_choice("adapter", name, ADAPTERS)].split(":")
    return getattr(importlib.import_module(module), cls)


def is_onnx_path(model: Any) -> bool:
    """Whether ``model`` is a path to an ONNX file (``.onnx``, any case).

    >>> is_onnx_path("nets/model.ONNX"), is_onnx_path("mypkg.jobs:make_model")
    (True, False)
    """
    return isinstance(model, (str, os.PathLike)) and os.fspath(model).lower().endswith(".onnx")


def adapter_for(model: Any) -> type[Adapter]:
    """The adapter class that handles this model's type."""
    # An ONNX model (or .onnx path) is recognised without importing the other backends (torch).
    looks_onnx = type(model).__module__.startswith("onnx") or is_onnx_path(model)
    for name in sorted(ADAPTERS, key=lambda n: n != "onnx") if looks_onnx else ADAPTERS:
        cls = adapter_class(name)
        if cls.accepts(model):
            return cls
    raise ConfigError(
        f"No adapter handles a model of type {type(model).__name__}: pass a torch.nn.Module, "
        f"an onnx.ModelProto or a path ending in .onnx, or name one with adapter= ({', '.join(ADAPTERS)})."
    )


__all__ = ["ADAPTERS", "Adapter", "adapter_class", "adapter_for", "is_onnx_path"]
