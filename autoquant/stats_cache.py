"""The calibration cache file: the adapter's statistics, sealed with a checksum and a fingerprint.

The adapter writes its statistics in its own format (``Adapter.save_stats``); this module wraps
them in an envelope ``{"format", "fingerprint", "sha256", "stats"}`` so that a truncated or
hand-edited file is detected (the job warns and calibrates again) and a file made for another
model or calibration data is refused. Writes go through unique temporary files in the cache's
folder (two workers sharing a folder never collide) and an atomic rename.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autoquant.errors import AutoquantError, ConfigError
from autoquant.fingerprint import Fingerprint

if TYPE_CHECKING:
    from autoquant.adapters import Adapter

log = logging.getLogger("autoquant")

FORMAT = 1


def load(backend: Adapter, path: Path, fp: Fingerprint) -> bool:
    """Restore the backend's statistics from ``path``; False (with a warning) when the file is
    missing, damaged or not loadable, so the caller calibrates. Another model's file is an error."""
    if not path.exists():
        return False
    try:
        envelope = json.loads(path.read_text())
        stats, stored = envelope["stats"], Fingerprint.from_dict(envelope["fingerprint"])
        damaged = envelope.get("format") != FORMAT or envelope["sha256"] != _checksum(stats)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("The calibration cache %s is unreadable (%s): calibrating again.", path, exc)
        return False
    if damaged:
        log.warning("The calibration cache %s fails its checksum (truncated or edited): calibrating again.", path)
        return False
    changed = fp.changes(stored)
    if changed:
        raise ConfigError(
            f"The calibration cache {path} was made for another model or data set ({changed} changed). "
            "Use a new output folder or job name, or start over with --restart (Tuner(..., restart=True)), "
            "which deletes the old study and cache."
        )
    with _temporary(path) as tmp:
        tmp.write_text(json.dumps(stats))
        try:
            return backend.load_stats(tmp)
        except (AutoquantError, OSError, ValueError) as exc:
            log.warning("Ignoring the calibration cache %s: %s", path, exc)
            return False


def save(backend: Adapter, path: Path, fp: Fingerprint) -> None:
    """Write the backend's statistics to ``path``; a failure is a warning (the job goes on)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _temporary(path) as raw, _temporary(path) as sealed:
            if not backend.save_stats(raw):
                return
            stats = json.loads(raw.read_text())
            envelope = {"format": FORMAT, "fingerprint": fp.to_dict(), "sha256": _checksum(stats), "stats": stats}
            sealed.write_text(json.dumps(envelope))
            os.replace(sealed, path)
    except (OSError, ValueError) as exc:
        log.warning("Could not write the calibration cache %s (%s): the next run calibrates again.", path, exc)


def _checksum(stats: Any) -> str:
    return hashlib.sha256(json.dumps(stats, sort_keys=True).encode()).hexdigest()


@contextmanager
def _temporary(path: Path) -> Iterator[Path]:
    """A unique file beside ``path``, removed afterwards unless it was renamed into place."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(name)
    finally:
        Path(name).unlink(missing_ok=True)
