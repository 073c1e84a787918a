"""Where a study lives: the Optuna storage, its lock, heartbeats and dead trials.

- `make_storage`: a database URL (RDBStorage, with heartbeats) or a journal file.
- `open_study`: create or load the study under the storage's lock, refusing a changed
  search space, objective or direction.
- `Heartbeat`: Optuna records heartbeats only inside `study.optimize`; an ask/tell loop
  records its own, from a thread, while a trial runs.
- `mark_dead_trials`: RUNNING trials whose process is gone (this machine) or whose
  heartbeat stopped (any machine) become FAIL, with the reason, and run again where
  `retry_failed` allows.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable
from typing import Any

from cnnstudy.errors import ConfigError
from cnnstudy.redact import redact_text
from cnnstudy.run.store import store_lock

HEARTBEAT_S = 20
GRACE_S = 3 * HEARTBEAT_S


def make_storage(url: str) -> Any:
    """An Optuna storage: a database URL (with heartbeats), or a journal file."""
    import optuna

    if url.startswith("journal://") or (
        "://" not in url and url.endswith((".log", ".journal", ".jsonl"))
    ):
        from optuna.storages.journal import JournalFileBackend

        path = url.removeprefix("journal://")
        return optuna.storages.JournalStorage(JournalFileBackend(path))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*heartbeat_interval.*")  # experimental
        return optuna.storages.RDBStorage(url, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S)


def open_study(url: str, name: str, directions: list[str], attrs: dict[str, Any]) -> Any:
    """The study `name` in `url`, created if need be, under the storage's lock (two
    processes creating one SQLite study at the same moment). `attrs` are the study's
    user attributes (without the `cnnstudy.` prefix): the search space and objective are
    written once and must match after; the rest (question, seeds, ...) are updated."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with store_lock(url):
        study = optuna.create_study(
            study_name=name,
            storage=make_storage(url),
            directions=directions,
            load_if_exists=True,
        )
        stored = study.user_attrs.get("cnnstudy.search_space")
        objective = study.user_attrs.get("cnnstudy.objective")
        if objective is not None and list(objective) != list(attrs["objective"]):
            raise ConfigError(
                f"hydra.sweeper.objective={attrs['objective']}: study {name} in "
                f"{redact_text(url)} was created with the objective {list(objective)}, and its "
                "values are of that metric. Give another study_name, or the same objective"
            )
        if stored is None:
            study.set_user_attr("cnnstudy.search_space", attrs["search_space"])
            study.set_user_attr("cnnstudy.objective", attrs["objective"])
        elif stored != attrs["search_space"]:
            raise ConfigError(
                f"hydra.sweeper.study_name={name}: the study in {redact_text(url)} was "
                f"created with the search space {stored}; this command's is "
                f"{attrs['search_space']}. Give another study_name, or the same space"
            )
        for key, value in attrs.items():
            if key in ("search_space", "objective"):
                continue
            if study.user_attrs.get(f"cnnstudy.{key}") != value:
                study.set_user_attr(f"cnnstudy.{key}", value)
        if [d.name.lower() for d in study.directions] != directions:
            raise ConfigError(
                f"hydra.sweeper.direction={directions}: study {name} was created "
                f"with {[d.name.lower() for d in study.directions]}"
            )
        # the processes that joined the study, this one included: each seeds its sampler
        # apart (samplers.build_sampler)
        joined = int(study.user_attrs.get("cnnstudy.processes", 0))
        study.set_user_attr("cnnstudy.processes", joined + 1)
    return study, joined


def beating(study: Any) -> Any:
    """The study's storage where it keeps heartbeats (a database; Optuna wraps it in a
    cache), or None (a journal file keeps none)."""
    from optuna.storages._heartbeat import BaseHeartbeat, is_heartbeat_enabled

    storage = study._storage
    if isinstance(storage, BaseHeartbeat) and is_heartbeat_enabled(storage):
        return storage
    return None


def mark_dead_trials(
    study: Any, retry_failed: int, ended: Callable[[Any, str], None] | None = None
) -> None:
    """RUNNING trials whose process is gone (this machine) or whose heartbeat stopped
    (any machine) are marked FAIL, with the reason, and `ended(trial, reason)` is called
    (their MLflow runs end too); with `retry_failed`, their parameters are queued to run
    again."""
    import optuna
    from optuna.trial import TrialState

    from cnnstudy.run.lifecycle import gone

    storage = study._storage
    stale: set[int] = set()
    if beating(study) is not None:
        # what optuna.storages.fail_stale_trials does, keeping the reason on the trial
        stale = set(storage._get_stale_trial_ids(study._study_id))
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        why = gone(trial.user_attrs)
        if not why and trial._trial_id in stale:
            host = trial.user_attrs.get("cnnstudy.host", "?")
            why = (
                f"no heartbeat for over {GRACE_S} s from process "
                f"{trial.user_attrs.get('cnnstudy.pid', '?')} on {host}"
            )
        if not why:
            continue
        try:
            storage.set_trial_user_attr(trial._trial_id, "fail_reason", why)
            storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another process marked it first
        print(f"trial {trial.number}: marked FAIL ({why})", flush=True)
        if ended is not None:
            ended(trial, why)
        retries = int(trial.user_attrs.get("retries", 0))
        if retries < retry_failed and trial.params:
            study.enqueue_trial(
                dict(trial.params),
                user_attrs={"retries": retries + 1, "retry_of": trial.number},
            )


class Heartbeat:
    """Records the trial's heartbeat in the storage while it runs: Optuna's own heartbeat
    runs only inside study.optimize, not with ask/tell."""

    def __init__(self, study: Any, trial: Any) -> None:
        self.study, self.trial = study, trial
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None

    def __enter__(self) -> Heartbeat:
        storage = beating(self.study)
        if storage is not None:
            storage.record_heartbeat(self.trial._trial_id)

            def beat() -> None:
                while not self.stop.wait(HEARTBEAT_S):
                    try:
                        storage.record_heartbeat(self.trial._trial_id)
                    except Exception:  # noqa: BLE001 -- a missed beat is retried next time
                        pass

            self.thread = threading.Thread(target=beat, name="optuna-heartbeat", daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(timeout=5)
