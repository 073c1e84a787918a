"""Shared helpers: run the real entry points in a fresh process, each in its own MLflow store."""

from __future__ import annotations

import atexit
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from importlib.metadata import entry_points
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def need_real_mnist() -> Path:
    """../shared/data, where real MNIST lies; without it the test skips, or fails where
    CNNSTUDY_REQUIRE_MNIST=1 (CI)."""
    if not (SHARED / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file():
        if os.environ.get("CNNSTUDY_REQUIRE_MNIST") == "1":
            pytest.fail(f"CNNSTUDY_REQUIRE_MNIST=1 but real MNIST is not in {SHARED}")
        pytest.skip("real MNIST not found in ../shared/data")
    return SHARED


def run_cli(
    name: str, *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """The console script NAME with ARGS in a new process, its output captured.

    cnnstudy-train, -reproduce and -report start as a fork of a process that has already
    imported torch, Lightning and MLflow (tests/forkserver.py): the script's own entry
    point, argv, environment and exit status, without 5-9 s of imports each time. An
    environment that sets what a process reads only when it starts (OMP_*, PYTHON*, ...)
    gets a fresh process, as does every command where CNNSTUDY_TEST_FORK=0."""
    full_env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    full_env.update(env or {})
    if name in _FORKED and os.environ.get("CNNSTUDY_TEST_FORK", "1") != "0":
        server = _ForkServer.get()
        if server.can_run(full_env):
            return server.run(name, list(args), cwd, full_env, timeout)
    return subprocess.run(
        [str(BIN / name), *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


_FORKED = {"cnnstudy-train", "cnnstudy-reproduce", "cnnstudy-report"}
_READ_AT_START = ("OMP_", "MKL_", "OPENBLAS_", "PYTHON", "LD_", "TORCH", "CUDA", "MALLOC")


class _ForkServer:
    """This test process's client of tests/forkserver.py, started at its first use."""

    _one: _ForkServer | None = None

    @classmethod
    def get(cls) -> _ForkServer:
        if cls._one is None or cls._one.proc.poll() is not None:
            cls._one = cls()
        return cls._one

    def __init__(self) -> None:
        ours, theirs = socket.socketpair()
        self.env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("forkserver.py")), str(theirs.fileno())],
            pass_fds=[theirs.fileno()],
            env=self.env,
            stdin=subprocess.DEVNULL,
        )
        theirs.close()
        self.sock = ours
        self.answers = ours.makefile("rb")
        self.lock = threading.Lock()
        atexit.register(self.close)

    def can_run(self, env: dict[str, str]) -> bool:
        """Whether a fork sees ENV as a new process would: the same start-time settings."""
        keys = {k for k in (*env, *self.env) if k.startswith(_READ_AT_START)}
        return all(env.get(k) == self.env.get(k) for k in keys)

    def run(
        self, name: str, args: list[str], cwd: Path, env: dict[str, str], timeout: float
    ) -> subprocess.CompletedProcess:
        (entry,) = [e.value for e in entry_points(group="console_scripts", name=name)]
        request = {
            "script": str(BIN / name),
            "entry": entry,
            "args": args,
            "cwd": str(cwd),
            "env": env,
        }
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        with self.lock:
            try:
                socket.send_fds(self.sock, [json.dumps(request).encode()], [out_w, err_w])
            finally:
                os.close(out_w)
                os.close(err_w)
            pid = self._answer()["pid"]
            out, err, late = _read_until_closed(out_r, err_r, time.monotonic() + timeout)
            if late:
                os.kill(pid, signal.SIGKILL)
            returncode = self._answer()["returncode"]
        argv = [request["script"], *args]
        if late:
            raise subprocess.TimeoutExpired(argv, timeout, out, err)
        return subprocess.CompletedProcess(argv, returncode, out, err)

    def _answer(self) -> dict:
        line = self.answers.readline()
        if not line:
            raise RuntimeError(f"tests/forkserver.py ended (exit {self.proc.wait()})")
        return json.loads(line)

    def close(self) -> None:
        self.sock.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _read_until_closed(out_r: int, err_r: int, deadline: float) -> tuple[str, str, bool]:
    """Both pipes read until every writer closed them (or DEADLINE: then late is True)."""
    chunks: dict[int, list[bytes]] = {out_r: [], err_r: []}
    late = False
    with selectors.DefaultSelector() as selector:
        for fd in chunks:
            selector.register(fd, selectors.EVENT_READ)
        while selector.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                late = True
                break
            for key, _ in selector.select(left):
                data = os.read(key.fd, 1 << 16)
                if data:
                    chunks[key.fd].append(data)
                else:
                    selector.unregister(key.fd)
    for fd in chunks:
        os.close(fd)
    out, err = (_text(b"".join(chunks[fd])) for fd in (out_r, err_r))
    return out, err, late


def _text(data: bytes) -> str:
    """As subprocess's text=True reads it: universal newlines."""
    return data.decode(errors="replace").replace("\r\n", "\n").replace("\r", "\n")


@pytest.fixture(scope="session", autouse=True)
def _own_data_cache(tmp_path_factory) -> None:
    """Decoded-data caches of the test session stay in its temporary folder."""
    os.environ["CNNSTUDY_CACHE"] = str(tmp_path_factory.mktemp("cnnstudy-cache"))


@pytest.fixture
def store(tmp_path: Path) -> dict[str, str]:
    """Overrides and environment that put a run's database and artifacts under tmp_path."""
    return {
        "uri": f"sqlite:///{tmp_path}/mlflow.db",
        "artifacts": str(tmp_path / "mlartifacts"),
    }


SMOKE = ("trainer=smoke", "trainer.num_threads=1", "logger.log_model=false")


def train_cli(where: Path, *overrides: str) -> tuple[subprocess.CompletedProcess, list]:
    """cnnstudy-train in its own MLflow store under `where`; the process and its runs."""
    import mlflow

    uri = f"sqlite:///{where}/mlflow.db"
    if not any(o.startswith("logger.log_images=") for o in overrides):
        overrides = (*overrides, "logger.log_images=false")  # tested in test_report.py
    result = run_cli(
        "cnnstudy-train",
        *overrides,
        f"logger.artifact_location={where}/mlartifacts",
        cwd=where,
        env={"MLFLOW_TRACKING_URI": uri},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    mlflow.set_tracking_uri(uri)  # runs:/ URIs resolve against the global store
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("cnnstudy")
    return result, client.search_runs([experiment.experiment_id])
