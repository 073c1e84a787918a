"""What the caller of the next training run asks of it, beyond its config: the MLflow run
to nest under, a run name, extra tags, extra Lightning callbacks. A study's sweeper sets
it around each trial's job (in this process; a worker process sets its own); `train()`
reads it. Nothing here imports torch."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any


@dataclass
class RunRequest:
    parent_run_id: str = ""
    run_name: str = ""
    tags: dict[str, str] = field(default_factory=dict)
    callbacks: list[Any] = field(default_factory=list)  # Lightning callbacks, e.g. pruning
    raise_config_errors: bool = True  # a study records them on the trial; a multirun prints
    # pictures for this run after all, when its metrics say so (a study: its best so far)
    pictures_if: Callable[[dict[str, float]], bool] | None = None
    run_id: str = ""  # filled in by train(): the run it started


_active: list[RunRequest] = []


@contextlib.contextmanager
def requested(request: RunRequest) -> Iterator[RunRequest]:
    _active.append(request)
    try:
        yield request
    finally:
        _active.remove(request)


def current() -> RunRequest | None:
    return _active[-1] if _active else None
