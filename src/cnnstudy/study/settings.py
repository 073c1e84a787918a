"""A study's settings: `hydra.sweeper.*` as plain data, checked before anything is created.

The Hydra plugin (hydra_plugins/cnnstudy_sweeper) declares the keys with their defaults
and comments; this is what the study code reads. Nothing here imports Optuna or torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cnnstudy.errors import ConfigError

DEFAULT_STORAGE = "sqlite:///optuna.db"
# what every run logs (cnnstudy.run.train), and so what a study can select on
OBJECTIVES = (
    "val/acc",
    "val/loss",
    "train/acc",
    "train/loss",
    "val/rmse",  # regressions (data.task=regression): in the targets' units
    "val/mae",
    "val/r2",
    "train/rmse",
    "train/mae",
    "train/r2",
    "model/params",
    "model/connections",
    "time/fit_s",
    "train/images_per_s",
)


@dataclass
class Settings:
    """hydra.sweeper.* (hydra_plugins.cnnstudy_sweeper.CnnstudySweeperConf), plain."""

    study_name: str | None = None
    storage: str | None = None
    n_trials: int | None = None  # default: 20, or every combination of a grid
    objective: Any = "val/acc"
    direction: Any = "maximize"
    directions: list[str] | None = None
    sampler: Any = None
    pruner: Any = None
    params: dict[str, str] = field(default_factory=dict)
    enqueue: list[dict[str, Any]] = field(default_factory=list)
    seeds: int = 1
    max_failures: int = 5
    max_rejected: int = 50  # trials in a row rejected by the shape check before stopping
    retry_failed: int = 0  # times a trial whose process died is run again, same parameters
    n_jobs: int = 1
    max_failure_rate: float | None = None  # hydra-optuna-sweeper's key, accepted
    question: str | None = None  # the question the study answers (its report's title)
    scientific: list[str] = field(default_factory=list)  # what the question is about
    nuisance: list[str] = field(default_factory=list)  # tuned at each scientific setting
    balance: bool = True  # each setting of a categorical scientific parameter in turn
    report: bool = True  # write the report at the end of every run of the study

    @property
    def objectives(self) -> list[str]:
        if isinstance(self.objective, str):
            return [self.objective]
        return [str(o) for o in self.objective]

    @property
    def all_directions(self) -> list[str]:
        given = self.directions or self.direction
        given = [given] if isinstance(given, str) else list(given)
        if len(given) == 1 and len(self.objectives) > 1:
            given = given * len(self.objectives)
        return [str(d) for d in given]

    @property
    def storage_url(self) -> str:
        return self.storage or DEFAULT_STORAGE


def check(settings: Settings) -> None:
    """A ConfigError naming the first key whose value cannot work."""

    def fail(key: str, value: Any, why: str) -> None:
        raise ConfigError(f"hydra.sweeper.{key}={value}: {why}")

    if settings.n_trials is not None and settings.n_trials < 1:
        fail("n_trials", settings.n_trials, "must be at least 1")
    if settings.seeds < 1:
        fail("seeds", settings.seeds, "must be at least 1")
    if settings.n_jobs < 1:
        fail("n_jobs", settings.n_jobs, "must be at least 1")
    if settings.max_failures < 1:
        fail("max_failures", settings.max_failures, "must be at least 1 (the first failure stops)")
    if settings.max_rejected < 1:
        fail("max_rejected", settings.max_rejected, "must be at least 1")
    if settings.retry_failed < 0:
        fail("retry_failed", settings.retry_failed, "must be 0 (no retry) or more")
    for name in settings.objectives:
        if name.startswith("test/"):
            fail(
                "objective",
                name,
                "test metrics are reported, never selected on; valid: " + ", ".join(OBJECTIVES),
            )
        if name not in OBJECTIVES:
            fail("objective", name, "no run logs it; valid: " + ", ".join(OBJECTIVES))
    if len(settings.all_directions) != len(settings.objectives):
        fail("directions", settings.all_directions, "needs one direction per objective")
    for d in settings.all_directions:
        if d not in ("maximize", "minimize"):
            fail("direction", d, "valid: maximize, minimize")
    for name, d in zip(settings.objectives, settings.all_directions, strict=True):
        better = "minimize" if name.endswith(("/loss", "/rmse", "/mae")) else None
        better = "maximize" if name.endswith(("/acc", "/r2")) else better
        if better and d != better:
            key = "directions" if settings.directions else "direction"
            fail(
                key,
                d,
                f"the objective {name} is better {'lower' if better == 'minimize' else 'higher'}"
                f": set hydra.sweeper.{key}={better}",
            )


def check_storage(url: str) -> None:
    """A storage that cannot work, said before anything is created: a SQLite file or a
    journal in a folder that does not exist."""
    from pathlib import Path

    from cnnstudy.run.store import sqlite_path

    path = sqlite_path(url)
    if path is None and (
        url.startswith("journal://")
        or ("://" not in url and url.endswith((".log", ".journal", ".jsonl")))
    ):
        path = Path(url.removeprefix("journal://")).resolve()
    if path is not None and not path.parent.is_dir():
        raise ConfigError(
            f"hydra.sweeper.storage={url}: the folder {path.parent} does not exist; create "
            "it, or give a storage in a folder that does (default: sqlite:///optuna.db)"
        )
    if path is None and "://" in url and not url.startswith("journal://"):
        from cnnstudy.run.store import check_store

        try:  # a database server: its driver installed, the server answering, in seconds
            check_store(url, create=False)
        except ConfigError as err:
            said = str(err).replace("tracking store ", "", 1)
            raise ConfigError(f"hydra.sweeper.storage: {said}") from None
