"""The adapter protocol: what the tuner needs from a quantization backend, and the calibration
plumbing every real backend shares (``TensorStatsAdapter``)."""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

from autoquant.calibration import CalibrationMethod, TensorStats, compute_range, read_stats, write_stats
from autoquant.data import first_batch, iterate_batches
from autoquant.errors import AutoquantError, BackendError, CalibrationDataError, first_line
from autoquant.space import QuantConfig, Space

log = logging.getLogger("autoquant")
# What a backend's observation yields: the statistics it fills, and a function observing one batch
# (the batch and its index, for error messages).
Observation = tuple[dict[str, TensorStats], Callable[[Any, int], None]]


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
    def calibrate(self, on_batch: Callable[[int], None] | None = None) -> None:
        """Collect activation statistics over the calibration data (once; later calls do nothing),
        calling ``on_batch(batches_done)`` after each batch (the tuner's progress display)."""

    @abstractmethod
    def build(self, config: QuantConfig) -> Any:
        """A quantized model for ``config``, ready for eval_fn."""

    def build_for_outputs(self, config: QuantConfig) -> Any:
        """``build`` for a model whose outputs are all that is used (the output probe's scores): it
        may share state with other candidates that changes its speed, never its outputs."""
        return self.build(config)

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
        """Write the statistics ``calibrate`` collected to ``path``, in the adapter's own format;
        False if unsupported. (``stats_cache`` seals the file and moves it into place atomically.)"""
        return False

    def load_stats(self, path: Path) -> bool:
        """Restore statistics written by ``save_stats`` so that ``calibrate`` does nothing; False
        if unsupported. Raises ``ConfigError`` when the file holds another model's tensors."""
        return False


class TensorStatsAdapter(Adapter):
    """An adapter whose calibration streams every observed tensor into a ``TensorStats``.

    The phases are split as in ONNX Runtime's ``CalibraterBase``: the backend writes only
    ``_observation`` (set up observers, observe one batch, tear down) and ``_stat_keys``; this class
    owns the rest: calibrate once, the batch loop and its errors, the non-finite warning, the
    statistics cache, and the range of a tensor per calibration method (computed once each). Given
    ``_as_inputs`` and ``_run``, it also runs a model on calibration batches (``runner``).
    """

    # Appended to the error of a batch the model fails on: what a batch must look like.
    batch_hint: ClassVar[str] = ""

    def __init__(self, calib_data: Iterable[Any]) -> None:
        self._calib_data = calib_data
        self._stats: dict[str, TensorStats] | None = None
        self._ranges: dict[tuple[str, str, bool], tuple[float, float]] = {}
        self._example = self._as_inputs(first_batch(calib_data), 0)  # the latency batch

    @abstractmethod
    def _as_inputs(self, batch: Any, index: int) -> Any:
        """A calibration batch as what ``_run`` passes to the model (checked; ``index`` for errors)."""

    @staticmethod
    @abstractmethod
    def _run(model: Any, inputs: Any) -> object:
        """The outputs of ``model`` on ``inputs``."""

    def runner(self, model: Any) -> Callable[[], object]:
        return partial(self._run, model, self._example)

    def batch_runners(self, model: Any, limit: int) -> list[Callable[[], object]]:
        batches = zip(range(limit), iterate_batches(self._calib_data), strict=False)
        return [partial(self._run, model, self._as_inputs(batch, i)) for i, batch in batches]

    @abstractmethod
    def _observation(self) -> AbstractContextManager[Observation]:
        """Observers attached for one pass over the calibration data (detached on exit)."""

    @abstractmethod
    def _stat_keys(self) -> set[str]:
        """The tensors ``calibrate`` keeps statistics for (a cache must hold exactly these)."""

    def _calibrated(self, stats: dict[str, TensorStats]) -> None:
        """Called when statistics arrive (calibrated or loaded); a backend may check them."""

    def calibrate(self, on_batch: Callable[[int], None] | None = None) -> None:
        self._statistics(on_batch)

    def _statistics(self, on_batch: Callable[[int], None] | None = None) -> dict[str, TensorStats]:
        """The statistics, collected over the calibration data on first use."""
        if self._stats is not None:
            return self._stats
        start, batches = time.perf_counter(), 0
        with self._observation() as (stats, observe):
            for batch in iterate_batches(self._calib_data):
                try:
                    observe(batch, batches)
                except AutoquantError:
                    raise
                except Exception as exc:
                    raise CalibrationDataError(
                        f"The model failed on calibration batch {batches}: {first_line(exc)}. {self.batch_hint}"
                    ) from exc
                batches += 1
                if on_batch is not None:
                    on_batch(batches)
        nonfinite = {k: s.nonfinite for k, s in stats.items() if s.nonfinite}
        if nonfinite:
            log.warning("Ignored non-finite activation values while calibrating (count per tensor): %s", nonfinite)
        log.info("Calibrated %d tensors over %d batch(es) in %.1f s.", len(stats), batches, time.perf_counter() - start)
        return self._use_stats(stats)

    def _ready(self, config: QuantConfig) -> dict[str, TensorStats]:
        """Refuse a config this adapter cannot build (an op it does not have, a knob value outside
        its space; a calibration method need only be registered); the statistics."""
        methods = tuple(m for m in {config.calibration, *config.op_calibration.values()} if m is not None)
        for method in methods:
            CalibrationMethod.parse(method)  # searched or not: CONTRIBUTING's recipe 2 builds unsearched ones
        replace(self.space, calibrations=methods or self.space.calibrations).validate(config)
        return self._statistics()

    def _use_stats(self, stats: dict[str, TensorStats]) -> dict[str, TensorStats]:
        self._stats, self._ranges = stats, {}
        self._calibrated(stats)
        return stats

    def _range(self, tensor: str, calibration: str, symmetric: bool) -> tuple[float, float]:
        """The (lo, hi) range of ``tensor`` under a calibration method, computed once."""
        key = (tensor, calibration, symmetric)
        if key not in self._ranges:
            if self._stats is None or tensor not in self._stats:
                raise BackendError(f"No calibration statistics for tensor '{tensor}' (an autoquant bug: report it).")
            method = CalibrationMethod.parse(calibration)
            try:
                self._ranges[key] = compute_range(self._stats[tensor], method, symmetric=symmetric)
            except CalibrationDataError as exc:  # name the tensor: the message alone cannot
                raise CalibrationDataError(f"Tensor '{tensor}': {exc}") from exc
        return self._ranges[key]

    def save_stats(self, path: Path) -> bool:
        """JSON of ``TensorStats.to_dict`` per observed tensor."""
        write_stats(path, self._statistics())
        return True

    def load_stats(self, path: Path) -> bool:
        self._use_stats(read_stats(path, self._stat_keys()))
        return True


def calibration_for(config: QuantConfig, readers: Iterable[str]) -> str:
    """The calibration method of a tensor read by ``readers``: that of its first INT8 reader with
    an override (``QuantConfig.calibration_of``), else the config's."""
    chosen = next((op for op in readers if op in config.op_calibration and op not in config.fp32_ops), None)
    method = config.calibration if chosen is None else config.calibration_of(chosen)
    if method is None:
        raise BackendError(f"{config.describe()} quantizes activations but names no calibration method "
                           "(an autoquant bug: please report it).")
    return method
