"""`make services` / `python -m cnnstudy services start|stop|status`: the servers a study
on many machines shares, on 127.0.0.1 unless told otherwise.

- PostgreSQL (Debian's cluster, started with `pg_ctlcluster`, administered as the
  `postgres` user with `runuser`): a role `cnnstudy` and two databases, `cnnstudy_optuna`
  (the Optuna storage of `storage=postgres`) and `cnnstudy_mlflow` (the backend store of
  the MLflow tracking server).
- An MLflow tracking server on that database (`logger=server`), its artifacts proxied:
  clients on other machines upload and read them through the server, no shared disk.

The role's password comes from CNNSTUDY_DB_PASSWORD, else from the file
CNNSTUDY_DB_PASSWORD_FILE (default ~/.config/cnnstudy/db-password, created with a random
password, mode 600, outside the repository). It is never on a command line, in a URL, a
config, a log or MLflow: the clients of cnnstudy read it themselves (`db_password`), the
server gets it as PGPASSWORD in its environment. Running `start` twice is harmless.
Plain Python: nothing here imports torch, MLflow or Optuna.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from cnnstudy.errors import ConfigError, console_script, user_errors_exit

ROLE = "cnnstudy"
OPTUNA_DB = "cnnstudy_optuna"
MLFLOW_DB = "cnnstudy_mlflow"
HOST = os.environ.get("CNNSTUDY_SERVICES_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("CNNSTUDY_PG_PORT", "5432"))
MLFLOW_PORT = int(os.environ.get("CNNSTUDY_MLFLOW_PORT", "5050"))
# each study process holds at most 3 connections (locks.engine_kwargs), the tracking
# server at most 16: 200 leaves room for about 50 workers
MAX_CONNECTIONS = int(os.environ.get("CNNSTUDY_PG_MAX_CONNECTIONS", "200"))


def state_dir() -> Path:
    """The server's log, pid and artifact store: outside the repository."""
    default = Path.home() / ".local" / "state" / "cnnstudy"
    return Path(os.environ.get("CNNSTUDY_SERVICES_DIR", default)).expanduser()


def password_file() -> Path:
    default = Path.home() / ".config" / "cnnstudy" / "db-password"
    return Path(os.environ.get("CNNSTUDY_DB_PASSWORD_FILE", default)).expanduser()


def db_password(create: bool = False) -> str | None:
    """The database role's password: CNNSTUDY_DB_PASSWORD, else the password file (made
    with a random password when `create`), else None."""
    given = os.environ.get("CNNSTUDY_DB_PASSWORD")
    if given:
        return given
    path = password_file()
    try:
        if path.is_file():
            return path.read_text().strip() or None
        if not create:
            return None
        path.parent.mkdir(parents=True, exist_ok=True)
        word = secrets.token_urlsafe(24)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another `make services` made it a moment ago
        return path.read_text().strip() or None
    except OSError as err:
        raise ConfigError(
            f"the database password file {path}: {err.strerror}; make it readable by you, "
            "or give the password in CNNSTUDY_DB_PASSWORD (CNNSTUDY_DB_PASSWORD_FILE names "
            "another file)"
        ) from None
    with os.fdopen(fd, "w") as handle:
        handle.write(word + "\n")
    return word


def optuna_url() -> str:
    return f"postgresql+psycopg://{ROLE}@{HOST}:{PG_PORT}/{OPTUNA_DB}"


def mlflow_backend_url() -> str:
    return f"postgresql+psycopg://{ROLE}@{HOST}:{PG_PORT}/{MLFLOW_DB}"


def mlflow_url() -> str:
    return f"http://{HOST}:{MLFLOW_PORT}"


# ------------------------------------------------------------------ PostgreSQL


def _cluster() -> tuple[str, str, str]:
    """(version, name, status) of the Debian cluster on PG_PORT."""
    if shutil.which("pg_lsclusters") is None:
        raise ConfigError(
            "PostgreSQL is not installed (no pg_lsclusters): make services installs Debian's "
            "postgresql package; or apt-get install postgresql"
        )
    out = subprocess.run(["pg_lsclusters", "-h"], capture_output=True, text=True)
    if out.returncode != 0:
        raise ConfigError(f"pg_lsclusters failed: {out.stderr.strip()}")
    rows = [line.split() for line in out.stdout.splitlines() if line.strip()]
    for row in rows:
        if int(row[2]) == PG_PORT:
            return row[0], row[1], row[3]
    raise ConfigError(
        f"no PostgreSQL cluster on port {PG_PORT} (pg_lsclusters lists "
        f"{[f'{r[0]}/{r[1]}:{r[2]}' for r in rows] or 'none'}); create one with "
        f"pg_createcluster, or set CNNSTUDY_PG_PORT to a cluster's port"
    )


def _psql(sql: str, database: str = "postgres") -> str:
    """SQL run as the postgres superuser, read from stdin (a password never on a command
    line that `ps` shows)."""
    if os.geteuid() != 0:
        raise ConfigError(
            "make services administers PostgreSQL as its `postgres` user (runuser): run it as "
            "root, or create the role and databases yourself (README: Services)"
        )
    done = subprocess.run(
        [
            "runuser",
            "-u",
            "postgres",
            "--",
            "psql",
            "-X",
            "-q",
            "-t",
            "-A",
            "-v",
            "ON_ERROR_STOP=1",
            "-p",
            str(PG_PORT),
            "-d",
            database,
        ],
        input=sql,
        capture_output=True,
        text=True,
        cwd="/",
    )
    if done.returncode != 0:
        raise ConfigError(f"PostgreSQL refused the set-up: {done.stderr.strip()}")
    return done.stdout.strip()


def _run(command: list[str]) -> None:
    """A command of PostgreSQL's tools; its error said in one line."""
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        said = (done.stderr or done.stdout).strip().splitlines()
        raise ConfigError(
            f"{' '.join(command[:4])} failed: {said[-1] if said else done.returncode}"
        )


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def start_postgres() -> None:
    if os.geteuid() != 0:
        raise ConfigError(
            "make services starts PostgreSQL with pg_ctlcluster and administers it as its "
            "`postgres` user (runuser): run it as root, or create the role and databases "
            "yourself and name them with CNNSTUDY_OPTUNA_STORAGE (README: Services)"
        )
    version, name, status = _cluster()
    if not status.startswith("online"):
        _run(
            [
                "pg_ctlcluster",
                version,
                name,
                "start",
                "-o",
                f"-c listen_addresses={HOST} -c max_connections={MAX_CONNECTIONS}",
            ]
        )
    password = db_password(create=True)
    exists = _psql(f"SELECT 1 FROM pg_roles WHERE rolname = {_literal(ROLE)}")
    verb = "ALTER" if exists == "1" else "CREATE"
    _psql(f"{verb} ROLE {ROLE} LOGIN PASSWORD {_literal(password)};")  # the file's, now
    for database in (OPTUNA_DB, MLFLOW_DB):
        if _psql(f"SELECT 1 FROM pg_database WHERE datname = {_literal(database)}") != "1":
            _psql(f"CREATE DATABASE {database} OWNER {ROLE};")
    print(f"PostgreSQL {version}/{name} on {HOST}:{PG_PORT}: databases {OPTUNA_DB}, {MLFLOW_DB}")


def stop_postgres() -> None:
    try:
        version, name, status = _cluster()
    except ConfigError:
        return
    if status.startswith("online"):
        _run(["pg_ctlcluster", version, name, "stop", "-m", "fast"])
    print(f"PostgreSQL {version}/{name}: stopped")


# ------------------------------------------------------------------ MLflow server


def _pid_file() -> Path:
    return state_dir() / "mlflow-server.pid"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def _server_pid() -> int | None:
    """The pid of the tracking server this project started, when it still runs: the pid
    file's, if that process is an `mlflow server` (a pid left by a reboot may name any
    process by now)."""
    try:
        pid = int(_pid_file().read_text().strip())
        command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return None
    ours = any(part.endswith(b"mlflow") for part in command) and b"server" in command
    return pid if ours else None


def healthy(url: str | None = None, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{url or mlflow_url()}/health", timeout=timeout) as r:
            return r.status == 200
    except OSError:
        return False


def start_mlflow() -> None:
    running = _server_pid()
    if running is not None:  # ours, started before: serving, or about to
        if _wait_healthy(running, 180):
            print(f"MLflow tracking server: already serving {mlflow_url()}")
            return
        raise ConfigError(
            f"the MLflow tracking server (pid {running}) runs but does not answer at "
            f"{mlflow_url()}; see {state_dir() / 'mlflow-server.log'}, or stop it: "
            "make services-stop"
        )
    if healthy():
        raise ConfigError(
            f"something that is not this project's server already answers at {mlflow_url()}; "
            "stop it, or set CNNSTUDY_MLFLOW_PORT to a free port"
        )
    folder = state_dir()
    artifacts = folder / "mlartifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    log = folder / "mlflow-server.log"
    mlflow = Path(sys.executable).with_name("mlflow")
    command = [
        str(mlflow) if mlflow.exists() else "mlflow",
        "server",
        "--backend-store-uri",
        mlflow_backend_url(),  # no password: PGPASSWORD, below
        "--artifacts-destination",
        str(artifacts),
        "--host",
        HOST,
        "--port",
        str(MLFLOW_PORT),
        "--workers",
        os.environ.get("CNNSTUDY_MLFLOW_WORKERS", "2"),
        # gunicorn's threaded workers, not MLflow's default uvicorn: a client keeps its
        # connection open, and uvicorn's answers on it took about 50 ms each here (a
        # delayed-ACK stall), gunicorn's 4-9 ms (README: Services)
        "--gunicorn-opts",
        "--worker-class gthread --threads 8 --keep-alive 30",
    ]
    env = {
        **os.environ,
        "PGPASSWORD": db_password(create=True) or "",
        "MLFLOW_DISABLE_TELEMETRY": os.environ.get("MLFLOW_DISABLE_TELEMETRY", "true"),
        # at most 2 x (4 + 4) database connections; no GenAI job runners (7 processes,
        # each with its connections): nothing of cnnstudy's uses them
        "MLFLOW_SQLALCHEMYSTORE_POOL_SIZE": "4",
        "MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW": "4",
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    with open(log, "ab") as out:
        server = subprocess.Popen(
            command,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=folder,
        )
    _pid_file().write_text(f"{server.pid}\n")
    # a fresh database: MLflow creates its tables first
    if _wait_healthy(server.pid, 180, server.poll):
        print(f"MLflow tracking server: {mlflow_url()} (artifacts in {artifacts}; log {log})")
        return
    tail = log.read_text(errors="replace").splitlines()[-5:]
    raise ConfigError(f"the MLflow tracking server did not start; {log} ends: {' | '.join(tail)}")


def _wait_healthy(pid: int, seconds: float, ended: Any = None) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if healthy():
            return True
        if (ended() if ended else None) is not None or not _alive(pid):
            return False
        time.sleep(0.5)
    return False


def stop_mlflow() -> None:
    pid = _server_pid()
    if pid is not None:
        try:
            os.killpg(pid, signal.SIGTERM)
        except OSError:
            pass
        deadline = time.monotonic() + 30
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _alive(pid):
            os.killpg(pid, signal.SIGKILL)
    _pid_file().unlink(missing_ok=True)
    print("MLflow tracking server: stopped")


def status() -> int:
    try:
        version, name, state = _cluster()
        print(f"PostgreSQL {version}/{name} on {HOST}:{PG_PORT}: {state}")
    except ConfigError as err:
        state = "missing"
        print(f"PostgreSQL: {err}")
    serving = healthy()
    print(f"MLflow tracking server {mlflow_url()}: {'serving' if serving else 'not serving'}")
    print("Use them: storage=postgres logger=server (README: Services)")
    return 0 if state == "online" and serving else 1


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m cnnstudy services",
        description="PostgreSQL and an MLflow tracking server for studies on many machines.",
    )
    p.add_argument("action", choices=("start", "stop", "status"))
    return p


@user_errors_exit
def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if args.action == "start":
        start_postgres()
        start_mlflow()
        print(f"storage=postgres: {optuna_url()}  logger=server: {mlflow_url()}")
    elif args.action == "stop":
        stop_mlflow()
        stop_postgres()
    else:
        sys.exit(status())


cli = console_script(main)
