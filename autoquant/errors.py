"""Exceptions autoquant raises. Every message names the problem and the fix."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from typing import Any


class AutoquantError(Exception):
    """Base class of every error autoquant raises on purpose."""


class ConfigError(AutoquantError, ValueError):
    """A setting is invalid: an unknown name, a value out of range, a contradiction."""


class CalibrationDataError(AutoquantError, ValueError):
    """The calibration data is empty or not in a form the model accepts."""


class BackendError(AutoquantError):
    """The backend cannot quantize or run this model."""


class EvalFunctionError(AutoquantError):
    """The user's eval_fn raised or returned something that is not a finite number.

    ``partial_result`` holds the best candidate and the history of the trials finished before the
    failure (None when the failure was on the FP32 baseline), so no finished work is lost.
    """

    def __init__(self, message: str, partial_result: Any = None) -> None:  # a TuneResult (errors imports none of ours)
        super().__init__(message)
        self.partial_result = partial_result


def did_you_mean(value: object, allowed: Iterable[str]) -> str:
    """" Did you mean 'x'?" for the closest allowed name, or "" when none is close."""
    hint = difflib.get_close_matches(str(value), list(allowed), n=1)
    return f" Did you mean '{hint[0]}'?" if hint else ""


def unknown_choice(what: str, value: object, allowed: Sequence[str], *, where: str = "") -> ConfigError:
    """The error for a name that is not one of ``allowed``: the name, a hint, the choices.

    >>> print(unknown_choice("key", "max_trails", ["name", "max_trials"], where=" under 'strategy'"))
    Unknown key 'max_trails' under 'strategy'. Did you mean 'max_trials'? Allowed: name, max_trials.
    """
    allowed = list(allowed)
    shown = ", ".join(allowed[:12]) + (", ..." if len(allowed) > 12 else "")
    return ConfigError(f"Unknown {what} '{value}'{where}.{did_you_mean(value, allowed)} Allowed: {shown}.")


def check_choice(what: str, value: str, allowed: Iterable[str], *, where: str = "") -> str:
    """``value`` if it is one of ``allowed``, else the ``unknown_choice`` error."""
    allowed = list(allowed)
    if value not in allowed:
        raise unknown_choice(what, value, allowed, where=where)
    return value


def first_line(exc: BaseException, limit: int = 400) -> str:
    """``Type: first line of the message``, bounded: backends raise pages of text."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:limit]
