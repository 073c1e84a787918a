"""User errors and exit codes, shared by every entry point. Imports nothing of cnnstudy.

A user error (a bad key, value or file) is one line on stderr, secrets redacted, and exit
code 2, with no traceback. A bug is a traceback. A run stopped by a signal exits with
128 + the signal's number, as a shell reports it: 130 for Ctrl-C, 143 for SIGTERM.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from typing import Any

EXIT_USER_ERROR = 2


class ConfigError(ValueError):
    """A user error: the message names the key or file, the value and what would be valid."""


class Interrupted(BaseException):  # noqa: N818 -- like KeyboardInterrupt, not an error
    """SIGINT or SIGTERM arrived during a run; the run was marked KILLED."""

    def __init__(self, signum: int) -> None:
        import signal

        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class Stopped(Exception):  # noqa: N818 -- a decision, not a failure
    """A run stopped on purpose before its last epoch (a study's pruner); `state` names it
    (PRUNED). The run is marked KILLED with the tag cnnstudy.trial_state."""

    def __init__(self, message: str, state: str = "PRUNED", epochs: int = 0) -> None:
        super().__init__(message)
        self.state = state
        self.epochs = epochs  # epochs trained when it stopped


class Diverged(Exception):  # noqa: N818 -- an outcome of training, not a bug
    """Training diverged: a loss became NaN or infinite. The run is FAILED, with the
    reason in the tag cnnstudy.fail_reason; in a study, the trial fails with it."""


def report(err: BaseException | str) -> None:
    from cnnstudy.log import get
    from cnnstudy.redact import redact_text

    get().error(f"cnnstudy: error: {redact_text(str(err))}")


def user_errors_exit(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run an entry point: ConfigError -> one line and exit 2; a signal -> 128 + its number."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ConfigError as err:
            report(err)
            sys.exit(EXIT_USER_ERROR)
        except Interrupted as stop:
            from cnnstudy.log import get

            get().error(f"cnnstudy: stopped by {stop}")
            sys.exit(stop.exit_code)

    return wrapper


def console_script(main: Callable[[], Any]) -> Callable[[], None]:
    """The console script around `main`: everything it prints is redacted (cnnstudy.redact);
    once main has returned (or exited) and the atexit handlers have run and output is
    flushed, the process ends at once. Python's own
    teardown would free every module of torch, Lightning and MLflow one by one: about 2 s
    after the summary, measured on this project's machine, for nothing. A bug still ends
    with its traceback."""

    @wraps(main)
    def run() -> None:
        import atexit
        import logging
        import os
        import signal

        from cnnstudy.redact import RedactingStream

        sys.stdout, sys.stderr = RedactingStream(sys.stdout), RedactingStream(sys.stderr)
        # MLflow 3 sends usage telemetry from every client call by default: off here (runs
        # stay on this machine and its servers); MLFLOW_DISABLE_TELEMETRY=false turns it on
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        interrupted: list[int] = []

        def ctrl_c(signum: int, frame: Any) -> None:
            # Python's own handler, remembered: a KeyboardInterrupt raised inside a
            # library's cleanup can come out as another error (seen: in OmegaConf, while
            # Hydra composes the config, as "'NoneType' object has no attribute
            # '_invalidate_flags_cache'", exit 1); a command stopped by Ctrl-C exits 130
            interrupted.append(signum)
            raise KeyboardInterrupt

        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            try:
                signal.signal(signal.SIGINT, ctrl_c)
            except ValueError:  # not the main thread: Python's handler stays
                pass
        stopped = False
        try:
            main()
            code: Any = 0
        except SystemExit as done:
            code = done.code
        except KeyboardInterrupt:  # Ctrl-C before a command notes signals itself
            code, stopped = 130, True
        if interrupted and code not in (0, None, 130):
            stopped = True  # the interrupt came out as another error on its way
        if stopped:
            from cnnstudy.log import get

            get().error("cnnstudy: stopped by SIGINT")
            code = 130
        if code is None:
            code = 0
        elif not isinstance(code, int):
            print(code, file=sys.stderr)
            code = 1
        atexit._run_exitfuncs()
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

    return run
