"""How every entry point reports a user error: one message on stderr, exit code 2, no traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from typing import Any

from cnnstudy.config import ConfigError

EXIT_USER_ERROR = 2


def report(err: BaseException) -> None:
    print(f"cnnstudy: error: {err}", file=sys.stderr)


def user_errors_exit(fn: Callable[..., Any]) -> Callable[..., Any]:
    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ConfigError as err:
            report(err)
            sys.exit(EXIT_USER_ERROR)

    return wrapper
