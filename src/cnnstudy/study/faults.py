"""Faults of the disk and the databases during a study, told as one line: which store or
file, what is wrong with it, what to do. Everything else stays a bug (a traceback).

A fault stops the study (exit 2) after its running trial is told FAIL and its runs are
ended where their store still works; what is stored is left as it was: cnnstudy never
repairs, recreates or rewrites a store it cannot read.
"""

from __future__ import annotations

import errno
from typing import Any

from cnnstudy.errors import ConfigError
from cnnstudy.redact import redact_text

LOCK_S = 60  # how long a study waits for a SQLite database another writer holds


def _chain(err: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    while err is not None and err not in seen:
        seen.append(err)
        err = err.__cause__ or err.__context__
    return seen


def _origin(err: BaseException) -> str | None:
    """Which library raised it, from the innermost frame of its traceback that is
    MLflow's or Optuna's."""
    found = None
    for link in _chain(err):
        tb = link.__traceback__
        while tb is not None:
            name = tb.tb_frame.f_code.co_filename
            if "/mlflow/" in name:
                found = "mlflow"
            elif "/optuna/" in name:
                found = "optuna"
            tb = tb.tb_next
        if found:
            return found
    return found


def _text(err: BaseException) -> str:
    """The database's own words, without SQLAlchemy's statement and links."""
    for link in _chain(err):
        orig = getattr(link, "orig", None)
        if orig is not None:
            return str(orig).strip().splitlines()[0]
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def explain(err: BaseException, *, storage: str, tracking: str) -> ConfigError | None:
    """The fault as a user error, or None when `err` is not a fault of a store or disk."""
    said = " ".join(str(link) for link in _chain(err)).lower()
    os_error = next((e for e in _chain(err) if isinstance(e, OSError)), None)
    origin = _origin(err)
    where = {
        "optuna": f"the Optuna storage {redact_text(storage)}",
        "mlflow": f"the MLflow store {redact_text(tracking)}",
    }.get(origin or "", "")
    if os_error is not None and os_error.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        place = os_error.filename or where or "a file the study writes"
        return ConfigError(
            f"{place}: no space left ({os_error.strerror}). Free space (df -h), then run the "
            "same command: the study resumes where it stopped"
        )
    if "database or disk is full" in said:
        return ConfigError(
            f"{where or 'a database of the study'}: the disk is full ({_text(err)}). Free "
            "space (df -h), then run the same command: the study resumes where it stopped"
        )
    if not where:
        if os_error is not None and os_error.errno in (errno.EACCES, errno.EROFS, errno.ENOTDIR):
            return ConfigError(
                f"{os_error.filename}: cannot write there ({os_error.strerror}); give a "
                "folder you can write"
            )
        return None
    if "database is locked" in said or "database table is locked" in said:
        return ConfigError(
            f"{where} stayed locked by another writer for over {LOCK_S} s; run the same "
            "command when it is free: the study resumes"
        )
    if "readonly database" in said or "read-only" in said:
        return ConfigError(
            f"{where} is read-only ({_text(err)}); make the file and its folder writable, "
            "or give another store"
        )
    if "disk i/o error" in said:  # SQLite's word for a write the disk refused
        return ConfigError(
            f"{where}: the disk refused a write (disk I/O error): no space left, a file size "
            "limit, or a failing disk; nothing else was changed. Free space (df -h), then run "
            "the same command: the study resumes where it stopped"
        )
    if any(w in said for w in ("file is not a database", "malformed")):
        return ConfigError(
            f"{where} is not a readable SQLite database ({_text(err)}): damaged or "
            "truncated; nothing was written to it. Restore it from a copy, or give another "
            "file"
        )
    if any(w in said for w in ("no such table", "no such column", "has no column named")):
        return ConfigError(
            f"{where} lacks part of its schema ({_text(err)}): damaged, or not "
            f"{'MLflow' if origin == 'mlflow' else 'Optuna'}'s. Restore it from a copy, or "
            "give another store"
        )
    if "unable to open database file" in said:
        return ConfigError(
            f"{where}: cannot open the database file ({_text(err)}); check the folder "
            "exists and can be written"
        )
    if any(w in said for w in ("connection refused", "could not connect", "timeout expired")):
        return ConfigError(
            f"{where}: the database server does not answer ({_text(err)}); start it, or "
            "give another store"
        )
    return None


def best_effort(step: Any, *args: Any) -> None:
    """A write that tidies up after a fault: tried once; its own failure is not the news."""
    try:
        step(*args)
    except Exception:  # noqa: BLE001 -- the store already failed once; the fault is said
        pass
