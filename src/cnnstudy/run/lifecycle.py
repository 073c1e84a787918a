"""How a run ends when it does not finish: signals, and processes that died without a word.

- SIGINT (Ctrl-C) and SIGTERM (a scheduler's timeout, `kill`) during a run raise
  `Interrupted` at the next safe point (between batches, at most): the run is marked
  KILLED in MLflow and the command exits 130 or 143, as a shell reports a process killed
  by that signal (never 0: a scheduler must not see success).
- `kill -9`, a crash of the machine or an out-of-memory kill leave no chance to write:
  each run records what identifies its process (host, pid, the process's start time and
  the machine's boot id), and the next cnnstudy command that opens the same store marks
  RUNNING runs whose process is gone as KILLED, with a tag saying why.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cnnstudy.errors import Interrupted

REASON_TAG = "cnnstudy.killed_reason"


_pending: list[int] = []  # signals received and not raised yet


@contextlib.contextmanager
def signals_interrupt(preemption: bool = False) -> Iterator[None]:
    """Inside the block (main thread only), SIGINT and SIGTERM (and with `preemption`,
    SLURM's SIGUSR2 before a job's time limit) are noted, not acted on at once;
    `raise_if_signalled()` raises Interrupted at the next safe point: between batches,
    between the steps of a run, between trials. Raised at any bytecode instead,
    the exception could land inside a database write and leave its connection holding the
    SQLite lock, so that marking the run KILLED then waited on it. Blocks nest; one noted
    signal is raised once, by the innermost check that sees it; one still noted when the
    outermost block ends is raised there."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def note(signum: int, frame: Any) -> None:
        if not _pending:
            _pending.append(signum)
        for hook in list(_on_signal):
            hook()

    noted = (signal.SIGINT, signal.SIGTERM, *((signal.SIGUSR2,) if preemption else ()))
    saved = {s: signal.signal(s, note) for s in noted}
    try:
        yield
        raise_if_signalled()
    finally:
        for s, old in saved.items():
            signal.signal(s, old)


_on_signal: list[Any] = []  # called when a signal is noted (stop_ranks_on_signal)


@contextlib.contextmanager
def stop_ranks_on_signal(trainer: Any) -> Iterator[None]:
    """A DDP fit's processes (spawned by Lightning, which waits on them in this process and
    forwards nothing) are killed when SIGINT or SIGTERM arrives during it: they end at
    once and the fit raises here, instead of training on to their last epoch. The noted
    signal is then raised as Interrupted, the run marked KILLED."""
    launcher = getattr(trainer.strategy, "launcher", None)

    def kill() -> bool:
        processes = getattr(launcher, "procs", None) or []
        for process in processes:
            if process.is_alive():
                os.kill(process.pid, signal.SIGKILL)
        return bool(processes)

    def stop() -> None:
        if launcher is None or kill():
            return

        def later() -> None:  # still spawning: Lightning lists them once they all started
            deadline = time.monotonic() + 120
            while not kill() and time.monotonic() < deadline:
                time.sleep(0.2)

        threading.Thread(target=later, name="cnnstudy-stop-ranks", daemon=True).start()

    _on_signal.append(stop)
    try:
        yield
    except Exception:
        raise_if_signalled()  # the ranks were stopped by the signal: Interrupted
        raise
    finally:
        _on_signal.remove(stop)


def raise_if_signalled() -> None:
    """A safe point: Interrupted, when SIGINT or SIGTERM arrived since the last one."""
    if _pending:
        raise Interrupted(_pending.pop())


def interrupted_by(default: int) -> Interrupted:
    """The Interrupted of the signal noted (taking it), else of `default`."""
    return Interrupted(_pending.pop() if _pending else default)


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _start_ticks(pid: int) -> str | None:
    """The process's start time in clock ticks after boot (/proc/PID/stat, field 22): with
    the pid, it names one process, even after the pid is reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def process_tags() -> dict[str, str]:
    pid = os.getpid()
    return {
        "cnnstudy.host": socket.gethostname(),
        "cnnstudy.pid": str(pid),
        "cnnstudy.process_start": _start_ticks(pid) or "",
        "cnnstudy.boot_id": _boot_id(),
    }


def gone(tags: dict[str, str]) -> str | None:
    """Why the process that wrote these run tags is gone, or None: alive, or on another
    machine (which this one cannot see)."""
    if tags.get("cnnstudy.host") != socket.gethostname() or "cnnstudy.pid" not in tags:
        return None
    pid, started = int(tags["cnnstudy.pid"]), tags.get("cnnstudy.process_start", "")
    if tags.get("cnnstudy.boot_id") and tags["cnnstudy.boot_id"] != _boot_id():
        return f"process {pid} ran before this machine ({tags['cnnstudy.host']}) rebooted"
    now = _start_ticks(pid)
    if now is None:
        return f"process {pid} on {tags['cnnstudy.host']} no longer exists"
    if started and now != started:
        return f"process {pid} on {tags['cnnstudy.host']} ended (its pid now names another)"
    return None


def mark_orphans(uri: str, by: str) -> list[str]:
    """Mark KILLED every RUNNING run of this machine whose process is gone; their ids."""
    import mlflow
    from mlflow.entities import ViewType

    client = mlflow.MlflowClient(uri)
    ids = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    marked = []
    for run in client.search_runs(ids, "attributes.status = 'RUNNING'", max_results=5000):
        why = gone(run.data.tags)
        if why is None:
            continue
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        client.set_tag(run.info.run_id, REASON_TAG, f"{why}; marked KILLED by {by} at {stamp}")
        client.set_terminated(run.info.run_id, "KILLED")
        marked.append(run.info.run_id)
    return marked
