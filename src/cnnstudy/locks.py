"""Locks across processes, and across machines, on a store (an Optuna storage or an
MLflow backend store): what makes every process of a study count and ask under one lock,
create one parent run and one schema.

- SQLite: an exclusive `flock` on a file beside the database (`optuna.db.lock`): one
  machine, the processes sharing its disk.
- PostgreSQL: `pg_advisory_xact_lock` in a transaction of its own connection: any number
  of machines; released when the transaction ends, or when the holder's connection dies
  (a worker killed with `kill -9`, or cut off from the network).
- Any other store: no lock (a server orders its own writes).

The lock is re-entrant within one thread. Plain Python and SQLAlchemy (Optuna's).
"""

from __future__ import annotations

import contextlib
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# one key per database: the lock is the store's, as the SQLite file lock is
ADVISORY_KEY = zlib.crc32(b"cnnstudy store lock")
_held = threading.local()  # url -> depth, for re-entry
_engines: dict[str, Any] = {}


def sqlite_path(uri: str) -> Path | None:
    """The database file of a sqlite:/// URI (relative to the cwd), or None (not SQLite, or
    an in-memory database)."""
    if not uri.startswith("sqlite:"):
        return None
    path = uri.removeprefix("sqlite:").removeprefix("//")
    path = path.split("?", 1)[0]
    if path in ("", "/", "/:memory:"):
        return None
    return Path(path[1:] if path.startswith("/") else path).resolve() if path else None


def is_postgres(uri: str) -> bool:
    return uri.split(":", 1)[0].split("+", 1)[0].lower() in ("postgresql", "postgres")


def engine_kwargs(uri: str) -> dict[str, Any]:
    """SQLAlchemy engine arguments for a database URL: on a server, connections tested
    before use (a connection idle for hours may have been dropped) and the role's password
    from CNNSTUDY_DB_PASSWORD or its file when the URL has none (never in the URL)."""
    if not is_postgres(uri):
        return {}
    from sqlalchemy.engine import make_url

    # a study process needs two connections at once (its loop and its heartbeat): many
    # workers on one server must not hold SQLAlchemy's default 5 + 10 each (PostgreSQL
    # allows 100 by default)
    kwargs: dict[str, Any] = {"pool_pre_ping": True, "pool_size": 2, "max_overflow": 1}
    if make_url(uri).password is None:
        from cnnstudy.services import db_password

        password = db_password()
        if password:
            kwargs["connect_args"] = {"password": password}
    return kwargs


def _engine(uri: str) -> Any:
    if uri not in _engines:
        import sqlalchemy

        kwargs = {**engine_kwargs(uri), "pool_size": 1, "max_overflow": 0}
        _engines[uri] = sqlalchemy.create_engine(uri, **kwargs)
    return _engines[uri]


@contextlib.contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """An exclusive lock on the store at `uri`, across processes (SQLite) or machines
    (PostgreSQL); a no-op for other stores."""
    depth = getattr(_held, "depth", None)
    if depth is None:
        depth = _held.depth = {}
    if depth.get(uri):
        depth[uri] += 1
        try:
            yield
        finally:
            depth[uri] -= 1
        return
    with _acquire(uri):
        depth[uri] = 1
        try:
            yield
        finally:
            depth[uri] = 0


@contextlib.contextmanager
def _acquire(uri: str) -> Iterator[None]:
    path = sqlite_path(uri)
    if path is not None:
        import fcntl

        with open(f"{path}.lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
        return
    if is_postgres(uri):
        import sqlalchemy

        with _engine(uri).connect() as connection, connection.begin():
            connection.execute(
                sqlalchemy.text("SELECT pg_advisory_xact_lock(:key)"), {"key": ADVISORY_KEY}
            )
            yield  # the transaction ends, and the lock with it, when the block does
        return
    yield
