"""Parallel trials on one machine: `n_jobs - 1` more processes of the same command, each
a study worker that asks the storage for its next trial (no batches) and prints its own
trial lines. Fresh interpreters, never a fork of this process (a process forked after
torch has used OpenMP hangs)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import Any

WORKER_ENV = "CNNSTUDY_STUDY_WORKER"
DRIVER_ENV = "CNNSTUDY_STUDY_DRIVER"  # the pid of the process that started the worker
STARTED_ENV = "CNNSTUDY_STUDY_STARTED"  # when the command started (ISO), for grid studies


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def is_worker() -> bool:
    return os.environ.get(WORKER_ENV) == "1"


def gpus() -> list[str]:
    """This machine's CUDA GPUs, as CUDA_VISIBLE_DEVICES names them (without importing
    torch: the driver has not trained yet)."""
    given = os.environ.get("CUDA_VISIBLE_DEVICES")
    if given is not None:
        return [g.strip() for g in given.split(",") if g.strip() and g.strip() != "-1"]
    import shutil

    if shutil.which("nvidia-smi") is None:
        return []
    try:
        listed = subprocess.run(
            ["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(k) for k, line in enumerate(listed.splitlines()) if line.startswith("GPU ")]


def share_gpus(devices: list[str], processes: int, per_trial: int) -> list[str | None]:
    """CUDA_VISIBLE_DEVICES of each process (the driver first): one GPU each (modulo their
    number), or with trials on several devices, a block each where there are enough for
    every process; else None (every GPU visible)."""
    if not devices:
        return [None] * processes
    if per_trial == 1:
        return [devices[k % len(devices)] for k in range(processes)]
    if per_trial * processes <= len(devices):
        return [",".join(devices[k * per_trial : (k + 1) * per_trial]) for k in range(processes)]
    return [None] * processes


def start_workers(
    count: int, threads: int, per_trial: int = 1, started: Any = None
) -> list[subprocess.Popen]:
    """`count` processes of this command, each training with `threads` torch threads.
    With GPUs, a trial per GPU (or per block of `per_trial` GPUs): process k (the driver
    is 0) sees its own only (`share_gpus`)."""
    env = {
        **os.environ,
        WORKER_ENV: "1",
        DRIVER_ENV: str(os.getpid()),
        "OMP_NUM_THREADS": str(threads),
        **({STARTED_ENV: started.isoformat()} if started is not None else {}),
    }
    shares = share_gpus(gpus(), count + 1, per_trial)
    if shares[0] is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = shares[0]  # the driver's, before CUDA starts
    # the command as it was started (a console script or python -m cnnstudy), unchanged:
    # the study's name is its overrides; each worker sets its threads as the driver does
    command = list(sys.orig_argv)
    started = []
    for k in range(1, count + 1):
        own = {} if shares[k] is None else {"CUDA_VISIBLE_DEVICES": shares[k]}
        started.append(subprocess.Popen(command, env={**env, **own}))
    return started


def stop_workers(workers: list[subprocess.Popen]) -> None:
    for worker in workers:
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
    for worker in workers:
        try:
            worker.wait(timeout=60)
        except subprocess.TimeoutExpired:
            worker.kill()


def reap(workers: list[subprocess.Popen]) -> None:
    """Collect the exit status of workers that ended: until then a dead worker's pid
    still names a (zombie) process, and its trial would wait for its heartbeat to go
    stale."""
    for worker in workers:
        worker.poll()


def wait_for_workers(workers: list[subprocess.Popen]) -> str:
    """Wait for every worker; what went wrong with them ("" when nothing did)."""
    failed = []
    for worker in workers:
        code = worker.wait()
        if code < 0:
            failed.append(f"worker {worker.pid} was killed by {signal.Signals(-code).name}")
        elif code != 0:
            failed.append(f"worker {worker.pid} exited with {code} (its output is above)")
    return "; ".join(failed)


def driver_pid() -> int:
    return int(os.environ.get(DRIVER_ENV, "0") or 0)


def driver_gone() -> bool:
    return bool(driver_pid()) and os.getppid() != driver_pid()


def follow_driver() -> None:
    """In a worker: when the process that started it is gone (kill -9 included), stop as
    on SIGTERM, at the next safe point (its trial FAIL, its run KILLED)."""
    import threading
    import time

    if not driver_pid():
        return

    def watch() -> None:
        while not driver_gone():
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="cnnstudy-driver-watch", daemon=True).start()
