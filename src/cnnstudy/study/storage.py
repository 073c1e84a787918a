"""Where a study lives: the Optuna storage, its lock, heartbeats and dead trials.

- `make_storage`: a database URL (RDBStorage) or a journal file.
- `open_study`: create or load the study under the storage's lock, refusing a changed
  search space, objective or direction.
- Each trial's process (host, pid, start time, boot id) and heartbeat are system
  attributes of the trial (`cnnstudy:process`, `cnnstudy:heartbeat`), written through the
  storage's public methods: bookkeeping that optuna-dashboard does not show among the
  trial's user attributes. The heartbeat is cnnstudy's own, on every storage (journal
  files included), because Optuna's runs only inside `study.optimize`, and because
  `optuna.storages.fail_stale_trials` marks a trial FAIL before its callback runs, when
  the trial can no longer take the reason.
- `mark_dead_trials`: RUNNING trials whose process is gone (this machine) or whose
  heartbeat stopped (any machine) become FAIL, with the reason, and run again where
  `retry_failed` allows.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from cnnstudy.errors import ConfigError
from cnnstudy.locks import store_lock
from cnnstudy.log import get as get_log
from cnnstudy.redact import redact_text

log = get_log("study")

HEARTBEAT_S = 20
GRACE_S = 3 * HEARTBEAT_S
PROCESS = "cnnstudy:process"  # system attribute: the process that runs the trial
HEARTBEAT = "cnnstudy:heartbeat"  # system attribute: its last beat (Unix time)


def make_storage(url: str) -> Any:
    """An Optuna storage: a database URL, or a journal file."""
    import optuna

    if url.startswith("journal://") or (
        "://" not in url and url.endswith((".log", ".journal", ".jsonl"))
    ):
        from optuna.storages.journal import JournalFileBackend

        path = url.removeprefix("journal://")
        return optuna.storages.JournalStorage(JournalFileBackend(path))
    from cnnstudy.locks import engine_kwargs
    from cnnstudy.study.faults import LOCK_S

    engine = engine_kwargs(url)  # PostgreSQL: pool_pre_ping, the password from its file
    if url.startswith("sqlite"):  # another writer's lock: wait for it, up to LOCK_S
        engine = {"connect_args": {"timeout": LOCK_S}}
    return optuna.storages.RDBStorage(url, engine_kwargs=engine)


def trial_id(study: Any, number: int) -> int:
    """The storage's id of trial `number` of the study (public storage methods)."""
    storage = study_storage(study)
    return storage.get_trial_id_from_study_id_trial_number(
        storage.get_study_id_from_name(study.study_name), number
    )


_storages: dict[int, Any] = {}  # id(study) -> the storage it was created with


def study_storage(study: Any) -> Any:
    return _storages[id(study)]


def claim(study: Any, trial: Any) -> None:
    """Record, on the trial, the process that runs it and its first heartbeat."""
    from cnnstudy.run.lifecycle import process_tags

    storage, tid = study_storage(study), trial_id(study, trial.number)
    process = {k.removeprefix("cnnstudy."): v for k, v in process_tags().items()}
    storage.set_trial_system_attr(tid, PROCESS, process)
    storage.set_trial_system_attr(tid, HEARTBEAT, time.time())


def process_of(trial: Any) -> dict[str, str]:
    """The process that ran a trial, as run tags name it (`cnnstudy.pid`, ...)."""
    return {f"cnnstudy.{k}": str(v) for k, v in trial.system_attrs.get(PROCESS, {}).items()}


def open_study(url: str, name: str, directions: list[str], attrs: dict[str, Any]) -> Any:
    """The study `name` in `url`, created if need be, under the storage's lock (two
    processes creating one SQLite study at the same moment). `attrs` are the study's
    user attributes (without the `cnnstudy.` prefix): the search space and objective are
    written once and must match after; the rest (question, seeds, ...) are updated."""
    import warnings

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with store_lock(url):
        storage = make_storage(url)
        study = optuna.create_study(
            study_name=name, storage=storage, directions=directions, load_if_exists=True
        )
        _storages[id(study)] = storage
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
        if study.metric_names is None:  # optuna-dashboard names its axes after them
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # experimental in Optuna 5
                study.set_metric_names(list(attrs["objective"]))
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
        _one_machine_only(study, url)
    return study, joined


def is_file_storage(url: str) -> bool:
    """A SQLite file or a journal file: one machine's processes only."""
    return url.startswith(("sqlite:", "journal://")) or (
        "://" not in url and url.endswith((".log", ".journal", ".jsonl"))
    )


def _one_machine_only(study: Any, url: str) -> None:
    """A SQLite or journal file on a disk shared by several machines loses writes (file
    locks do not hold across network file systems, nor does cnnstudy's lock): a study in
    one, whose trial is running on another machine (its heartbeat fresh), is refused,
    naming PostgreSQL. A study resumed on another machine (a new container, another
    login node) is not: no other machine is at work on it."""
    import socket

    from optuna.trial import TrialState

    if not is_file_storage(url):
        return
    host, now = socket.gethostname(), time.time()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        other = (trial.system_attrs.get(PROCESS) or {}).get("host")
        beat = trial.system_attrs.get(HEARTBEAT)
        if other and other != host and beat is not None and now - float(beat) <= GRACE_S:
            raise ConfigError(
                f"hydra.sweeper.storage={redact_text(url)}: trial {trial.number} of study "
                f"{study.study_name} is running on {other}, and this is {host}; a SQLite or "
                "journal file cannot be shared by several machines. Use a database server: "
                "storage=postgres (make services starts one; README: Services)"
            )


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

    storage = study_storage(study)
    study_id = storage.get_study_id_from_name(study.study_name)
    now = time.time()
    for trial in storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
        process = process_of(trial) or dict(trial.user_attrs)  # user attrs: before 0.2
        why = gone(process)
        beat = trial.system_attrs.get(HEARTBEAT)
        if beat is None and trial.datetime_start is not None:  # died before its first beat
            beat = trial.datetime_start.timestamp()  # Optuna's clock: naive local time
        if not why and beat is not None and now - float(beat) > GRACE_S:
            why = (
                f"no heartbeat for over {GRACE_S} s from process "
                f"{process.get('cnnstudy.pid', '?')} on {process.get('cnnstudy.host', '?')}"
            )
        if not why:
            continue
        tid = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
        try:
            storage.set_trial_user_attr(tid, "fail_reason", why)
            storage.set_trial_state_values(tid, state=TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another process marked it first
        log.warning(f"trial {trial.number}: marked FAIL ({why})")
        if ended is not None:
            ended(trial, why)
        retries = int(trial.user_attrs.get("retries", 0))
        if retries < retry_failed and trial.params:
            run_again(study, trial, retries=retries + 1)


def run_again(study: Any, trial: Any, **attrs: Any) -> None:
    """Queue the trial's parameters again (its process died, or its job was preempted):
    the new trial names the old (`retry_of`) and stays the baseline if it was one."""
    keep = {k: v for k, v in trial.user_attrs.items() if k in ("enqueued", "retries")}
    study.enqueue_trial(dict(trial.params), user_attrs={**keep, "retry_of": trial.number, **attrs})


class Heartbeat:
    """Records the trial's heartbeat every HEARTBEAT_S seconds while it runs."""

    def __init__(self, study: Any, trial: Any) -> None:
        self.study, self.trial = study, trial
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None

    def __enter__(self) -> Heartbeat:
        claim(self.study, self.trial)
        storage, tid = study_storage(self.study), trial_id(self.study, self.trial.number)

        def beat() -> None:
            while not self.stop.wait(HEARTBEAT_S):
                try:
                    storage.set_trial_system_attr(tid, HEARTBEAT, time.time())
                except Exception:  # noqa: BLE001 -- a missed beat is retried next time
                    pass

        self.thread = threading.Thread(target=beat, name="cnnstudy-heartbeat", daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(timeout=5)
