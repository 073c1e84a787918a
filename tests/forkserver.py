"""A process that has imported the heavy libraries once and forks one child per command.

Run as `python tests/forkserver.py FD` by `conftest.run_cli`, FD one end of a Unix socket
pair. Importing torch, Lightning, MLflow and torchvision costs 5-9 s a process; the
tests start well over a hundred `cnnstudy-train` and `cnnstudy-reproduce` processes. Each
request forks this process, and the child runs the console script's own entry point as
the script would: its argv, environment, working folder, `__main__`, exit status and
at-exit handlers. No torch operation runs here before a fork (OpenMP is not started: a
fork after it is would hang), and no cnnstudy module is imported here, so every child
imports cnnstudy afresh and reads its environment as a new process does.

Protocol, on the socket: the client sends one JSON request (`script`, `entry`, `args`,
`cwd`, `env`) with the stdout and stderr file descriptors attached; the server answers
`{"pid": N}` at once and `{"returncode": R}` when the child ends (-N for signal N, as
subprocess gives).
"""

from __future__ import annotations

import json
import os
import socket
import sys

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
del torch


def _run_child(request: dict, out_fd: int, err_fd: int) -> None:
    """In the forked child: become the console script and exit as it would."""
    import atexit
    import importlib
    import threading
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
    while True:
        try:
            message, fds, _, _ = socket.recv_fds(sock, 1 << 20, 2)
        except (ConnectionError, OSError):
            return
        if not message:
            return
        request = json.loads(message)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            sock.close()
            _run_child(request, *fds)
        for fd in fds:
            os.close(fd)
        sock.sendall(json.dumps({"pid": pid}).encode() + b"\n")
        _, status = os.waitpid(pid, 0)
        sock.sendall(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}).encode() + b"\n")


if __name__ == "__main__":
    serve(socket.socket(fileno=int(sys.argv[1])))
