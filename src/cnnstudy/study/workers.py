"""Parallel trials on one machine: `n_jobs - 1` more processes of the same command, each
a study worker that asks the storage for its next trial (no batches) and prints its own
trial lines. Fresh interpreters, never a fork of this process (a process forked after
torch has used OpenMP hangs)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

WORKER_ENV = "CNNSTUDY_STUDY_WORKER"


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def is_worker() -> bool:
    return os.environ.get(WORKER_ENV) == "1"


def start_workers(count: int, threads: int) -> list[subprocess.Popen]:
    """`count` processes of this command, each training with `threads` torch threads."""
    env = {**os.environ, WORKER_ENV: "1", "OMP_NUM_THREADS": str(threads)}
    command = [sys.argv[0], *sys.argv[1:], f"trainer.num_threads={threads}"]
    return [subprocess.Popen(command, env=env) for _ in range(count)]


def stop_workers(workers: list[subprocess.Popen]) -> None:
    for worker in workers:
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
    for worker in workers:
        try:
            worker.wait(timeout=60)
        except subprocess.TimeoutExpired:
            worker.kill()


def wait_for_workers(workers: list[subprocess.Popen]) -> bool:
    """Whether any worker failed."""
    return any(worker.wait() != 0 for worker in workers)
