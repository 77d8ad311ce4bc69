"""Where a study lives: the storage URLs a job may name, resolved and opened in one place.

    (none)                      a SQLite file in the output folder (single process)
    sqlite:///PATH              a SQLite file (PATH relative to the job file's folder)
    journal:PATH                Optuna's journal file: several processes on one machine or NFS
    postgresql://user:pw@host/db, or any SQLAlchemy URL: several machines
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import optuna
from optuna.storages.journal import JournalFileBackend

from autoquant.errors import ConfigError

SQLITE, JOURNAL = "sqlite:///", "journal:"
_PASSWORD = re.compile(r"(://[^:/@]+:)([^@]+)(@)")


def resolve_url(text: str | None, *, base: Path, default_file: Path) -> str:
    """The URL with environment variables expanded and file paths made absolute against ``base``."""
    if not text:
        return SQLITE + str(default_file)
    url = os.path.expandvars(text)
    for prefix in (JOURNAL, SQLITE):
        if url.startswith(prefix):
            path = Path(os.path.expanduser(url[len(prefix):]))
            return prefix + str(path if path.is_absolute() else (base / path).resolve())
    return url


def local_path(url: str) -> Path | None:
    """The file of a SQLite or journal storage; None for a database server."""
    for prefix in (JOURNAL, SQLITE):
        if url.startswith(prefix):
            return Path(url[len(prefix):])
    return None


def exists(url: str) -> bool:
    """False when a file-backed storage has no file yet (opening it would create one)."""
    path = local_path(url)
    return path is None or path.exists()


def open_storage(url: str) -> str | optuna.storages.BaseStorage:
    """What ``Tuner(storage=...)`` and ``optuna.load_study`` take; the folder of a file is created."""
    path = local_path(url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    if url.startswith(JOURNAL):
        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    if url.startswith(SQLITE):
        return url
    return _rdb_storage(url)


def _rdb_storage(url: str) -> optuna.storages.BaseStorage:
    """Optuna's RDB storage, tolerating workers that create the schema of a new database at once."""
    import sqlalchemy.exc

    for attempt in range(5):
        try:
            return optuna.storages.RDBStorage(url)
        except sqlalchemy.exc.IntegrityError:  # another worker created the same table a moment earlier
            time.sleep(0.5 * (attempt + 1))
        except ImportError as exc:
            raise ConfigError(f"storage {mask_url(url)}: no database driver ({exc}); for PostgreSQL "
                              "pip install 'psycopg[binary]'.") from None
    return optuna.storages.RDBStorage(url)


def mask_url(url: str) -> str:
    """A storage URL safe to print: ``postgresql://user:***@host/db``.

    >>> mask_url("postgresql://me:s3cret@db:5432/aq")
    'postgresql://me:***@db:5432/aq'
    """
    return _PASSWORD.sub(r"\1***\3", url)
