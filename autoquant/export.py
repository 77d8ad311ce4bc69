"""ONNX export of an FX INT8 result (``TuneResult.save(..., onnx=True)``).

torch's TorchScript-based exporter (``dynamo=False``) maps the static INT8 ops of an FX model
(quantize/dequantize, quantized conv and linear) to ONNX QuantizeLinear/DequantizeLinear and
QLinear ops that ONNX Runtime runs; the dynamo exporter needs ``onnxscript`` and has no
quantized-op support. Dynamic INT8 Linear (``quantized::linear_dynamic``) has no ONNX export.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from autoquant.errors import AutoquantError, first_line

ONNX_FILE = "model.onnx"


def export_onnx(model: Any, example: tuple[tuple[Any, ...], dict[str, Any]], path: Path) -> Path:
    """Write ``model`` (an FX INT8 model) as ONNX, traced on ``example`` = (args, kwargs)."""
    import torch

    args, kwargs = example
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the legacy exporter's deprecation notes: one per call
            torch.onnx.export(model, tuple(args), str(path), kwargs=kwargs or None, dynamo=False)
    except Exception as exc:
        dynamic = "linear_dynamic" in str(exc)
        hint = ("dynamic INT8 Linear has no ONNX export in torch: tune with approach: static, or quantize the "
                "ONNX export of the FP32 model with the ONNX Runtime adapter" if dynamic else
                "quantize the ONNX export of the FP32 model with the ONNX Runtime adapter instead")
        raise AutoquantError(f"Could not export the INT8 model to ONNX ({first_line(exc)}): {hint}.") from exc
    return path
