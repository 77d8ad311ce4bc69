"""A cheap, eval_fn-free signal for strategies: how far a candidate's outputs are from FP32."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from autoquant.errors import first_line
from autoquant.space import QuantConfig, Space

if TYPE_CHECKING:
    from autoquant.adapters import Adapter

log = logging.getLogger("autoquant")


class OutputProbe:
    """Runs candidates on the adapter's fixed calibration batch and compares outputs with FP32.

    ``error`` is the relative squared error ||y - y_fp32||^2 / ||y_fp32||^2 over all outputs.
    Strategies use it to rank ops by sensitivity without calling the user's eval_fn. A candidate
    that cannot be built or run has an infinite error (the reason is logged and kept in
    ``failures``), so a ranking steps past it rather than ending the job.
    """

    def __init__(self, adapter: Adapter, space: Space) -> None:
        self._adapter, self._space = adapter, space
        self._reference: np.ndarray | None = None
        self.calls = 0
        self.failures: dict[str, str] = {}  # config key -> why it could not be built or run

    def outputs(self, config: QuantConfig) -> np.ndarray:
        model = self._adapter.build(self._space.resolve(self._space.canonical(config)))
        return flatten_outputs(self._adapter.runner(model)())

    def error(self, config: QuantConfig) -> float:
        if self._reference is None:
            self._reference = flatten_outputs(self._adapter.runner(self._adapter.fp32_model)())
        self.calls += 1
        try:
            outputs = self.outputs(config)
        except Exception as exc:  # a candidate the backend cannot build or run
            self.failures[config.key()] = first_line(exc)
            log.warning("Probe: candidate %s failed (%s); it ranks as infinitely far from FP32.",
                        config.describe(), first_line(exc))
            return math.inf
        difference = outputs - self._reference
        return float(np.sum(difference**2) / max(float(np.sum(self._reference**2)), 1e-30))


def flatten_outputs(outputs: Any) -> np.ndarray:
    """Every float in a model's outputs (tensors, arrays, and nested lists, tuples or dicts of them)."""
    parts: list[np.ndarray] = []

    def visit(value: Any) -> None:
        if hasattr(value, "detach"):  # a torch tensor; core code does not import torch
            parts.append(value.detach().float().cpu().numpy().ravel())
        elif isinstance(value, np.ndarray):
            parts.append(value.astype(np.float64, copy=False).ravel())
        elif isinstance(value, Mapping):
            for item in value.values():
                visit(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                visit(item)

    visit(outputs)
    if not parts:
        raise TypeError(f"The model's outputs hold no tensor or array (got {type(outputs).__name__}).")
    return np.concatenate([p.astype(np.float64, copy=False) for p in parts])
