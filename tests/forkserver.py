"""A process that has imported the heavy libraries once and forks one child per command.

Run as `python tests/forkserver.py FD` by `conftest._ForkServer` (for `run_cli` and
`start_cli`), FD one end of a Unix socket pair. Importing torch, Lightning, MLflow and
torchvision costs 5-9 s a process; the tests start well over a hundred `cnnstudy-train`
and `cnnstudy-reproduce` processes. Each request forks this process, and the child runs
the console script's own entry point as the script would: its argv, environment,
working folder, `__main__`, exit status and at-exit handlers. No torch operation runs
here before a fork (OpenMP is not started: a fork after it is would hang), and no
cnnstudy module is imported here, so every child imports cnnstudy afresh and reads its
environment as a new process does.

Protocol: the client sends one JSON request (`script`, `entry`, `args`, `cwd`, `env`,
`new_session`) on the server's socket, with three file descriptors attached: the
command's stdout and stderr, and one end of a socket pair of the request's own. On that
socket a waiter process (forked for the request, the command's parent) answers
`{"pid": N}` once the command has started and `{"returncode": R}` when it ends (-N for
signal N, as subprocess gives). Commands run at once, as many as are started.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading

# What every cnnstudy-train process imports: paid once here instead of once per command.
import hydra  # noqa: F401
import lightning  # noqa: F401
import mlflow  # noqa: F401
import mlflow.store.tracking.sqlalchemy_store  # noqa: F401
import optuna  # noqa: F401
import torch
import torch._dynamo  # noqa: F401  (torch.optim imports it at an optimizer's first use)
import torchvision  # noqa: F401

assert "cnnstudy" not in sys.modules, "the fork server must not import cnnstudy"
# a fork copies one thread: a lock another Python thread held would stay held in the copy
assert threading.active_count() == 1, f"threads started by an import: {threading.enumerate()}"
del torch


def _run_child(request: dict, out_fd: int, err_fd: int) -> None:
    """In the forked child: become the console script and exit as it would."""
    import atexit
    import importlib
    import traceback
    import types

    code = 1
    try:
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(out_fd, 1)
        os.dup2(err_fd, 2)
        for fd in (devnull, out_fd, err_fd):
            os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        script = request["script"]
        sys.argv = [script, *request["args"]]
        sys.orig_argv = [sys.executable, *sys.argv]  # as the kernel starts the script
        sys.path[0] = os.path.dirname(script)  # as for `python SCRIPT`
        main = types.ModuleType("__main__")  # a spawned worker re-runs the script, guarded
        main.__file__ = script
        main.__spec__ = None
        sys.modules["__main__"] = main
        module, _, name = request["entry"].partition(":")
        try:
            returned = getattr(importlib.import_module(module), name)()
            code = _exit_code(returned)
        except SystemExit as stop:
            code = _exit_code(stop.code)
        except KeyboardInterrupt:
            traceback.print_exc()
            code = 130
        except BaseException:  # noqa: BLE001 - printed as Python prints an uncaught one
            traceback.print_exc()
            code = 1
        threading._shutdown()  # non-daemon threads are joined at exit, as at any exit
        atexit._run_exitfuncs()
    except BaseException:  # noqa: BLE001 - the set-up failed (a folder missing, ...): said
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001 - a closed pipe: nothing more to write
                pass
        os._exit(code)


def _exit_code(value: object) -> int:
    """What `sys.exit(value)` makes the process's exit status."""
    if value is None:
        return 0
    if isinstance(value, int):
        return value & 0xFF
    print(value, file=sys.stderr)
    return 1


def serve(sock: socket.socket) -> None:
    """Each request: fork a waiter, which forks the command's process, says its pid, waits
    for it and says how it ended, on the request's own socket; the server goes on at once."""
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps the waiters
    while True:
        try:
            message, fds, _, _ = socket.recv_fds(sock, 1 << 20, 3)
        except (ConnectionError, OSError):
            return
        if not message:
            return
        request = json.loads(message)
        out_fd, err_fd, status_fd = fds
        sys.stdout.flush()
        sys.stderr.flush()
        if os.fork() == 0:
            sock.close()
            _wait_for_child(request, out_fd, err_fd, socket.socket(fileno=status_fd))
        for fd in fds:
            os.close(fd)


def _wait_for_child(request: dict, out_fd: int, err_fd: int, status: socket.socket) -> None:
    """In the waiter: start the command's process, say its pid, wait, say how it ended."""
    code = 1
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the command waits for its own
        pid = os.fork()
        if pid == 0:
            status.close()
            if request.get("new_session"):
                os.setsid()
            _run_child(request, out_fd, err_fd)
        os.close(out_fd)
        os.close(err_fd)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the command's to answer
        status.sendall(json.dumps({"pid": pid}).encode() + b"\n")
        _, waited = os.waitpid(pid, 0)
        answer = {"returncode": os.waitstatus_to_exitcode(waited)}
        status.sendall(json.dumps(answer).encode() + b"\n")
        code = 0
    finally:
        os._exit(code)


if __name__ == "__main__":
    serve(socket.socket(fileno=int(sys.argv[1])))
