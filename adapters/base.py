"""The adapter protocol: what the tuner needs from a quantization backend."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from autoquant.space import QuantConfig, Space


class Adapter(ABC):
    """Wraps one backend for one model.

    Construction inspects the model (cheap: traces, lists ops, builds ``space``); ``calibrate``
    runs the calibration data once and keeps statistics; ``build`` turns any config of the space
    into a runnable quantized model from those statistics, without touching data again.
    """

    name: ClassVar[str]
    space: Space

    @classmethod
    @abstractmethod
    def accepts(cls, model: Any) -> bool:
        """Whether this adapter handles models of this type."""

    @property
    @abstractmethod
    def fp32_model(self) -> Any:
        """The unquantized model, in the form eval_fn receives."""

    @abstractmethod
    def calibrate(self) -> None:
        """Collect activation statistics over the calibration data (once; later calls do nothing)."""

    @abstractmethod
    def build(self, config: QuantConfig) -> Any:
        """A quantized model for ``config``, ready for eval_fn."""

    @abstractmethod
    def runner(self, model: Any) -> Callable[[], object]:
        """A zero-argument callable running ``model`` once on a fixed calibration batch and
        returning its outputs (for latency, and for the output probe)."""

    def batch_runners(self, model: Any, limit: int) -> list[Callable[[], object]]:
        """One zero-argument callable per calibration batch (the first ``limit``), each running
        ``model`` on it and returning its outputs (for the output probe). The default offers the
        latency batch only; the probe reports how many batches it used."""
        return [self.runner(model)]

    def result_model(self, model: Any) -> Any:
        """The form a built model takes in ``TuneResult.model`` (ONNX: the ModelProto of a session)."""
        return model

    @abstractmethod
    def save_model(self, model: Any, directory: Path) -> Path:
        """Write ``model`` into ``directory``; return the file written."""

    @classmethod
    @abstractmethod
    def load_model(cls, path: Path) -> Any:
        """Load a model written by ``save_model``."""

    # --- calibration cache (optional) ---------------------------------------------------------
    def save_stats(self, path: Path) -> bool:
        """Write the statistics ``calibrate`` collected to the file ``path``; False if unsupported.

        Contract: call after ``calibrate``; write atomically (a temporary file, then rename) so a
        killed job never leaves a half-written cache; the format is the adapter's own.
        """
        return False

    def load_stats(self, path: Path) -> bool:
        """Restore statistics written by ``save_stats`` so that ``calibrate`` does nothing.

        Returns False if this adapter has no cache. Raises ``ConfigError`` when the file does not
        belong to this model (other tensors), so the caller recalibrates instead of using it.
        """
        return False
