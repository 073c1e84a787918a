"""The MLflow tracking store: which one, checked before a run starts, safe for many writers.

- `tracking_uri`: an explicit URI (cnnstudy-reproduce --tracking-uri), else
  MLFLOW_TRACKING_URI (MLflow's convention), else the config's logger.tracking_uri.
- `check_store`: in plain Python and within seconds, before torch is imported: a SQLite
  file that cannot be opened, a database driver that is not installed, a server that does
  not answer. Reading commands pass create=False: they never create a store.
- `serialized`: MLflow creates its tables, experiments and datasets by looking first, then
  inserting; two processes doing so at once on one SQLite file collide. Those steps run
  under an exclusive lock on a file beside the database (`mlflow.db.lock`); on a server,
  a collision is retried.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from cnnstudy.errors import ConfigError
from cnnstudy.locks import sqlite_path, store_lock  # noqa: F401 -- the store's lock
from cnnstudy.redact import redact_text

T = TypeVar("T")

# database URI scheme -> (default driver module, pip package)
_DRIVERS = {
    "postgresql": ("psycopg2", "psycopg2-binary"),
    "postgres": ("psycopg2", "psycopg2-binary"),
    "mysql": ("MySQLdb", "mysqlclient"),
    "mssql": ("pyodbc", "pyodbc"),
}
_NAMED_DRIVERS = {
    "psycopg2": "psycopg2-binary",
    "psycopg": "psycopg",
    "pg8000": "pg8000",
    "pymysql": "pymysql",
    "mysqldb": "mysqlclient",
    "pyodbc": "pyodbc",
}
_PORTS = {"postgresql": 5432, "postgres": 5432, "mysql": 3306, "mssql": 1433, "http": 80}


def tracking_uri(cfg: Any, explicit: str | None = None) -> str:
    return explicit or os.environ.get("MLFLOW_TRACKING_URI") or cfg.logger.tracking_uri


def _where(uri: str) -> str:
    return f"tracking store {redact_text(uri)}"


def _reachable(uri: str, default_port: int) -> None:
    parts = urlsplit(uri)
    host, port = parts.hostname or "127.0.0.1", parts.port or default_port
    try:
        with socket.create_connection((host, port), timeout=3):
            pass
    except OSError as err:
        raise ConfigError(
            f"{_where(uri)}: nothing answers at {host}:{port} ({err.strerror or err}). Start "
            "the server, or use a local file: logger.tracking_uri=sqlite:///mlflow.db "
            "(MLFLOW_TRACKING_URI, when set, wins)"
        ) from None


def check_store(uri: str, create: bool = True) -> None:
    """A ConfigError, secrets redacted, when the store at `uri` cannot be used; creates
    nothing when `create` is False (a missing SQLite file is then an error)."""
    scheme = uri.split(":", 1)[0].lower() if ":" in uri else ""
    base, _, driver = scheme.partition("+")
    if scheme == "sqlite":
        path = sqlite_path(uri)
        if path is None:
            return
        if not path.exists():
            if not create:
                raise ConfigError(
                    f"{_where(uri)}: no such file ({path}); nothing has been logged there yet. "
                    "Train a run first (make demo), or point MLFLOW_TRACKING_URI (or "
                    "--tracking-uri) at the store that holds your runs"
                )
            _can_create(uri, path)
            return  # created by the run's first write, not by a check
        if not path.is_file():
            raise ConfigError(f"{_where(uri)}: {path} is not a file")
        import sqlite3

        try:
            con = sqlite3.connect(path, timeout=30)
            try:
                con.execute("pragma schema_version").fetchone()
            finally:
                con.close()
        except sqlite3.Error as err:
            raise ConfigError(
                f"{_where(uri)}: cannot open {path} as a SQLite database ({err}). Valid: a "
                "file you can write in a folder that exists, e.g. sqlite:///mlflow.db"
            ) from None
        return
    if base in _DRIVERS:
        module, package = _DRIVERS[base]
        if driver:
            module, package = driver, _NAMED_DRIVERS.get(driver, driver)
        if importlib.util.find_spec(module) is None:
            raise ConfigError(
                f"{_where(uri)}: the database driver {module} is not installed; "
                f"pip install {package}"
            )
        _reachable(uri, _PORTS[base])
        return
    if base in ("http", "https"):
        _reachable(uri, 443 if base == "https" else 80)
        return
    if base in ("", "file"):
        raise ConfigError(
            f"{_where(uri)}: MLflow 3 keeps runs in a database or behind a server, not in a "
            "folder; valid: sqlite:///mlflow.db, postgresql://..., http://host:port"
        )


def _can_create(uri: str, path: Path) -> None:
    """A new SQLite file can be made in its folder: tried with a scratch file, removed."""
    import tempfile

    if not path.parent.is_dir():
        raise ConfigError(f"{_where(uri)}: folder {path.parent} does not exist")
    try:
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".cnnstudy-check-"):
            pass
    except OSError as err:
        raise ConfigError(
            f"{_where(uri)}: cannot create {path} ({err.strerror}). Valid: a file in a folder "
            "you can write, e.g. sqlite:///mlflow.db"
        ) from None


def serialized(uri: str, step: Callable[[], T]) -> T:
    """`step` (an MLflow call that looks up, then inserts) under the store's lock; on a
    server, retried once when another writer inserted the same thing first."""
    from mlflow.exceptions import MlflowException

    with store_lock(uri):
        _create_sqlite_store(uri)
        try:
            return step()
        except MlflowException as err:
            text = str(err).lower()
            if sqlite_path(uri) is not None or not any(
                w in text for w in ("unique", "duplicate", "already exists")
            ):
                raise
    time.sleep(0.2)
    return step()


def _create_sqlite_store(uri: str) -> None:
    """A new SQLite store gets MLflow's tables in a scratch file beside it, renamed into
    place once they are all there: a command stopped while MLflow creates them (a
    signal, kill -9) leaves no half-made store behind. (MLflow's migrations, interrupted,
    leave a file whose next opening fails: "table _alembic_tmp_... already exists".)
    Called under the store's lock; nothing to do where the file exists."""
    path = sqlite_path(uri)
    if path is None or path.exists():
        return
    import gc
    import uuid

    import mlflow

    # a name never used before: MLflow keeps a store per URI for the process's life
    scratch = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.creating")
    try:
        client = mlflow.MlflowClient(f"sqlite:///{scratch}")
        client.search_experiments(max_results=1)  # the tables, made and read back
        store = getattr(getattr(client, "_tracking_client", None), "store", None)
        engine = getattr(store, "engine", None)
        if engine is not None:
            engine.dispose()  # its connections closed before the file moves
        del client
        gc.collect()
        os.replace(scratch, path)
    finally:
        scratch.unlink(missing_ok=True)


def open_experiment(uri: str, name: str, artifact_location: str) -> str:
    """The id of experiment `name` in the store, created (with its tables, the first time)
    if need be; safe when many processes start at once."""
    import mlflow

    def get_or_create() -> str:
        client = mlflow.MlflowClient(uri)
        experiment = client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        if uri.startswith(("http:", "https:")):  # the server's artifact store (proxied)
            return client.create_experiment(name)
        return client.create_experiment(name, artifact_location=artifact_uri(artifact_location))

    return serialized(uri, get_or_create)


def artifact_uri(location: str) -> str:
    if "://" in location:
        return location
    return Path(location).resolve().as_uri()
