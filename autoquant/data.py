"""Calibration batches: what a batch may look like and how it becomes model inputs."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from autoquant.errors import CalibrationDataError


def model_inputs(batch: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Positional and keyword inputs of one batch.

    A dict is keyword inputs; a tuple or list is ``(input, label, ...)`` and only its first item is
    used; anything else is the single positional input.
    """
    if isinstance(batch, dict):
        return (), batch
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise CalibrationDataError("A calibration batch is an empty tuple/list: yield (inputs, labels) or inputs.")
        return model_inputs(batch[0]) if isinstance(batch[0], dict) else ((batch[0],), {})
    return (batch,), {}


def iterate_batches(data: Iterable[Any]) -> Iterator[Any]:
    """Iterate calibration data, failing clearly when it is empty or not iterable."""
    try:
        iterator = iter(data)
    except TypeError:
        raise CalibrationDataError(
            f"Calibration data must be an iterable of batches (a DataLoader or a list), got {type(data).__name__}."
        ) from None
    empty = True
    for batch in iterator:
        empty = False
        yield batch
    if empty:
        raise CalibrationDataError(
            "The calibration dataloader yielded no batch: pass a non-empty DataLoader or list of batches "
            "(a few hundred samples are typical)."
        )


def batch_count(data: Iterable[Any]) -> int | None:
    """How many batches ``data`` holds, if it says (a list or DataLoader does; a generator does not)."""
    try:
        return len(data)  # type: ignore[arg-type]
    except TypeError:
        return None


def first_batch(data: Iterable[Any]) -> Any:
    """The first batch (for tracing and for latency measurement)."""
    return next(iterate_batches(data))
