"""Shared helpers: run the real entry points in a fresh process, each in its own MLflow store."""

from __future__ import annotations

import atexit
import json
import os
import select
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
    """The console script NAME with ARGS in a new process (see `start_cli`), its output
    captured; the environment is this process's, without MLFLOW_TRACKING_URI, plus ENV."""
    full_env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    full_env.update(env or {})
    argv = [str(BIN / name), *args]
    proc = start_cli(
        argv, cwd=cwd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()  # not communicate(): a process it started may still hold the pipes
        raise
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def start_cli(argv: list[str], *, cwd: Path, env: dict[str, str] | None = None, **popen):
    """subprocess.Popen(ARGV, ...) for a console script of BIN.

    cnnstudy-train, -reproduce and -report start as a fork of a process that has already
    imported torch, Lightning and MLflow (tests/forkserver.py): the script's own entry
    point, argv, environment, folder and exit status, without 5-9 s of imports each time.
    Its handle has Popen's pid, stdout, stderr, returncode, poll, wait, communicate,
    send_signal, terminate and kill. Every other command, and every command where
    CNNSTUDY_TEST_FORK=0, is a plain Popen."""
    env = dict(os.environ if env is None else env)
    name = Path(argv[0]).name
    if (
        Path(argv[0]).parent == BIN
        and name in _FORKED
        and os.environ.get("CNNSTUDY_TEST_FORK", "1") != "0"
    ):
        return _Forked(_ForkServer.get(env), argv, cwd, env, **popen)
    return subprocess.Popen(argv, cwd=cwd, env=env, **popen)


_FORKED = {"cnnstudy-train", "cnnstudy-reproduce", "cnnstudy-report"}
# what a process reads when it starts, not later: a fork server of its own for each setting
_READ_AT_START = (
    *("OMP_", "MKL_", "OPENBLAS_", "PYTHON", "LD_", "TORCH", "CUDA", "MALLOC", "LANG", "LC_"),
    *("TZ", "RANK", "LOCAL_RANK", "WORLD_SIZE", "SLURM_", "JSM_"),  # Lightning's rank at import
)


class _ForkServer:
    """A client of tests/forkserver.py, one per setting of what a process reads when it
    starts (OMP_NUM_THREADS, ...), started at its first use in this test process."""

    _all: dict[tuple, _ForkServer] = {}

    @classmethod
    def get(cls, env: dict[str, str]) -> _ForkServer:
        key = tuple(sorted((k, v) for k, v in env.items() if k.startswith(_READ_AT_START)))
        if key not in cls._all or cls._all[key].proc.poll() is not None:
            cls._all[key] = cls(env)
        return cls._all[key]

    def __init__(self, env: dict[str, str]) -> None:
        # one request a message: SOCK_SEQPACKET keeps their bounds
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        own = {  # this process's environment, with the start-time settings of ENV
            **{k: v for k, v in os.environ.items() if not k.startswith(_READ_AT_START)},
            **{k: v for k, v in env.items() if k.startswith(_READ_AT_START)},
        }
        own.pop("MLFLOW_TRACKING_URI", None)
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("forkserver.py")), str(theirs.fileno())],
            pass_fds=[theirs.fileno()],
            env=own,
            stdin=subprocess.DEVNULL,
        )
        theirs.close()
        self.sock = ours
        self.lock = threading.Lock()
        atexit.register(self.close)

    def send(self, request: dict, fds: list[int]) -> None:
        with self.lock:
            socket.send_fds(self.sock, [json.dumps(request).encode()], fds)

    def close(self) -> None:
        self.sock.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class _Forked:
    """What subprocess.Popen gives, for a command forked by tests/forkserver.py."""

    def __init__(
        self,
        server: _ForkServer,
        argv: list[str],
        cwd: Path,
        env: dict[str, str],
        stdout=None,
        stderr=None,
        text: bool = False,
        start_new_session: bool = False,
    ) -> None:
        (entry,) = [e.value for e in entry_points(group="console_scripts", name=Path(argv[0]).name)]
        self.args = argv
        self.returncode: int | None = None
        self.stdout = self.stderr = None
        sent: list[int] = []  # our copies of what the command gets, closed once sent
        out = self._end(stdout, "stdout", text, sent)
        err = out if stderr == subprocess.STDOUT else self._end(stderr, "stderr", text, sent)
        ours, theirs = socket.socketpair()
        sent.append(theirs.detach())
        request = {
            "script": argv[0],
            "entry": entry,
            "args": argv[1:],
            "cwd": str(cwd),
            "env": env,
            "new_session": start_new_session,
        }
        try:
            server.send(request, [out, err, sent[-1]])
        finally:
            for fd in sent:
                os.close(fd)
        self._status = ours
        self._said = b""
        try:
            self.pid = self._answer(300)["pid"]  # the server's imports, at its first use
        except subprocess.TimeoutExpired:
            raise RuntimeError(
                f"tests/forkserver.py started no {argv[0]} in 300 s "
                f"(server exit status: {server.proc.poll()})"
            ) from None

    def _end(self, given, name: str, text: bool, sent: list[int]) -> int:
        """The file descriptor the command writes NAME to."""
        if given == subprocess.PIPE:
            read, write = os.pipe()
            setattr(self, name, open(read, "r" if text else "rb"))  # noqa: SIM115
        elif given == subprocess.DEVNULL:
            write = os.open(os.devnull, os.O_WRONLY)
        elif given is None:  # this process's own
            write = os.dup(1 if name == "stdout" else 2)
        else:
            write = os.dup(given if isinstance(given, int) else given.fileno())
        sent.append(write)
        return write

    def _answer(self, timeout: float | None) -> dict:
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self._said:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([self._status], [], [], left)[0]:
                raise subprocess.TimeoutExpired(self.args, timeout)
            data = self._status.recv(4096)
            if not data:
                raise RuntimeError(
                    f"tests/forkserver.py's waiter of {self.args[0]} ended without saying how "
                    "the command did"
                )
            self._said += data
        line, self._said = self._said.split(b"\n", 1)
        return json.loads(line)

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                self.wait(0)
            except subprocess.TimeoutExpired:
                pass
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            self.returncode = self._answer(timeout)["returncode"]
            self._status.close()
        return self.returncode

    def communicate(self, timeout: float | None = None) -> tuple:
        """stdout and stderr read to their end, then the exit: as Popen.communicate."""
        deadline = None if timeout is None else time.monotonic() + timeout
        if not hasattr(self, "_readers"):
            self._read = {}
            self._readers = [
                threading.Thread(target=self._read_all, args=(f,), daemon=True)
                for f in (self.stdout, self.stderr)
                if f is not None
            ]
            for reader in self._readers:
                reader.start()
        for reader in self._readers:
            reader.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if reader.is_alive():
                raise subprocess.TimeoutExpired(self.args, timeout)
        self.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return (self._read.get(self.stdout), self._read.get(self.stderr))

    def _read_all(self, stream) -> None:
        self._read[stream] = stream.read()
        stream.close()

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:  # it ended (its waiter reaped it) since poll(): as Popen
                pass

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def __enter__(self) -> _Forked:
        return self

    def __exit__(self, *_) -> None:
        for stream in (self.stdout, self.stderr):
            if stream is not None and not stream.closed and not hasattr(self, "_readers"):
                stream.close()
        self.wait()


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
