"""A study: Optuna's ask/tell loop over Hydra jobs, one MLflow parent run, resumable.

The sweeper plugin (hydra_plugins/cnnstudy_sweeper) hands `run_study` its settings
(`hydra.sweeper.*`), the composed config, Hydra's launcher and config loader. Each trial:

1. asks Optuna for values of the search space (`params:` and the command line's sweeps);
2. composes the job's config and runs the shape check: a network that cannot exist is
   rejected in milliseconds, recorded with its reason, and marked infeasible
   (`trial.set_constraint`) so that constraint-aware samplers learn to avoid it;
3. launches the job (`seeds` of them, one per seed) as a child run of the study's MLflow
   parent run, with a pruning callback when a pruner is set;
4. tells Optuna the objective: the validation metric(s) `objective` names, the mean over
   seeds, never a test metric.

Re-running the same command resumes: trials that finished (complete or pruned) count
towards `n_trials`; trials left RUNNING by a dead process are marked FAIL.

A plain comma multirun (`cnnstudy-train -m model.hidden_units=50,100 model.pool=max,avg`,
no sweep file) is a grid study: every combination once, named after the command, so that
the same command resumes it and retries the combinations that failed.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from cnnstudy.errors import ConfigError, Interrupted, Stopped
from cnnstudy.redact import redact_text
from cnnstudy.run.lifecycle import raise_if_signalled, signals_interrupt
from cnnstudy.run.store import store_lock
from cnnstudy.study import samplers
from cnnstudy.study import space as spaces

DEFAULT_STORAGE = "sqlite:///optuna.db"
HEARTBEAT_S = 20
SHAPE_CONSTRAINT = "shape_check"
REJECTED = "rejected"  # user attribute of a trial whose network failed the shape check


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


def _check(settings: Settings) -> None:
    def fail(key: str, value: Any, why: str) -> None:
        raise ConfigError(f"hydra.sweeper.{key}={value}: {why}")

    if settings.n_trials is not None and settings.n_trials < 1:
        fail("n_trials", settings.n_trials, "must be at least 1")
    if settings.seeds < 1:
        fail("seeds", settings.seeds, "must be at least 1")
    if settings.n_jobs < 1:
        fail("n_jobs", settings.n_jobs, "must be at least 1")
    for name in settings.objectives:
        if not name.startswith(("val/", "train/", "model/", "time/")):
            fail(
                "objective",
                name,
                "a study selects on validation (or training) metrics, e.g. val/acc, val/loss, "
                "on the network's size (model/params) and training time (time/fit_s); test "
                "metrics are reported, never selected on",
            )
    if len(settings.all_directions) != len(settings.objectives):
        fail("directions", settings.all_directions, "needs one direction per objective")
    for d in settings.all_directions:
        if d not in ("maximize", "minimize"):
            fail("direction", d, "valid: maximize, minimize")


def _run_config(cfg: DictConfig) -> DictConfig:
    """A composed job config without its `hydra` node: what a run sees."""
    return OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])


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
        return optuna.storages.RDBStorage(
            url, heartbeat_interval=HEARTBEAT_S, grace_period=3 * HEARTBEAT_S
        )


def tell(study: Any, trial: Any, told: Any) -> bool:
    """study.tell with values, or with a state; whether the sampler has exhausted its space.
    Samplers that can (brute force) call study.stop(), which raises outside
    study.optimize: the trial is stored by then, and the study loop stops."""
    from optuna.trial import TrialState

    try:
        if isinstance(told, TrialState):
            study.tell(trial, state=told)
        else:
            study.tell(trial, told)
    except RuntimeError as err:
        if "Study.stop" not in str(err):
            raise
        return True
    return False


def _key(params: dict[str, Any]) -> str:
    return repr(sorted(params.items()))


def _product(values: Any) -> list[tuple[Any, ...]]:
    import itertools

    return list(itertools.product(*values))


@dataclass
class _Outcome:
    state: str  # COMPLETE, PRUNED, FAIL, REJECTED
    values: list[float] | None = None
    reason: str = ""
    run_id: str = ""
    seconds: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)  # mean over seeds


KEPT_METRICS = ("val/acc", "val/loss", "test/acc", "test/loss", "model/params", "time/fit_s")


class StudyRunner:
    def __init__(self, settings: Settings, config: DictConfig, launcher: Any, loader: Any):
        self.settings = settings
        self.config = config
        self.launcher = launcher
        self.loader = loader
        self.job_idx = 0
        self.failures = 0
        self.exhausted = False  # the sampler has covered its whole space
        self.timings: list[dict[str, float]] = []  # sampler and storage time per trial

    # ------------------------------------------------------------------ set-up

    def _study(self, space: dict[str, Any]) -> Any:
        import optuna

        s = self.settings
        url = self.url = s.storage or DEFAULT_STORAGE
        name = s.study_name or self._default_name()
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        with store_lock(url):  # two processes creating one SQLite study at the same moment
            storage = make_storage(url)
            study = optuna.create_study(
                study_name=name,
                storage=storage,
                directions=s.all_directions,
                load_if_exists=True,
            )
            described = spaces.describe(space)
            stored = study.user_attrs.get("cnnstudy.search_space")
            if stored is None:
                study.set_user_attr("cnnstudy.search_space", described)
                study.set_user_attr("cnnstudy.objective", s.objectives)
            elif stored != described:
                raise ConfigError(
                    f"hydra.sweeper.study_name={name}: the study in {redact_text(url)} was "
                    f"created with the search space {stored}; this command's is {described}. "
                    "Give another study_name, or the same space"
                )
            for key, value in (  # what the study's report reads
                ("question", s.question),
                ("scientific", list(s.scientific)),
                ("nuisance", list(s.nuisance)),
                ("seeds", s.seeds),
            ):
                if study.user_attrs.get(f"cnnstudy.{key}") != value:
                    study.set_user_attr(f"cnnstudy.{key}", value)
            if [d.name.lower() for d in study.directions] != s.all_directions:
                raise ConfigError(
                    f"hydra.sweeper.direction={s.all_directions}: study {name} was created "
                    f"with {[d.name.lower() for d in study.directions]}"
                )
        study.sampler = samplers.build_sampler(
            self.sampler_spec, trials_before=len(study.trials), grid=self.grid
        )
        study.pruner = samplers.build_pruner(self.pruner_spec)
        return study

    def _sweep_file(self) -> str | None:
        choice = self.config.hydra.runtime.choices.get("sweep")
        return None if choice is None else str(choice)

    def _default_name(self) -> str:
        """The sweep file's name; for a plain multirun, its command (the same command
        resumes the same study)."""
        if self._sweep_file():
            return self._sweep_file()
        command = redact_text(" ".join(sorted(self.arguments)))
        name = f"multirun {command}".strip()
        if len(name) > 200:
            digest = hashlib.sha1(command.encode()).hexdigest()[:10]
            name = f"{name[:180]} ... {digest}"
        return name

    def _choose_sampler(self, space: dict[str, Any]) -> None:
        """The sampler: as set; else grid for a plain multirun of values (Hydra's meaning,
        every combination once), TPE otherwise."""
        spec = samplers.spec("sampler", self.settings.sampler)
        if spec is None:
            plain = not self._sweep_file() and not self.settings.params
            try:
                spaces.grid(space)
            except ConfigError:
                plain = False
            spec = samplers.spec("sampler", "grid" if plain else "tpe")
        self.sampler_spec = spec
        self.pruner_spec = samplers.spec("pruner", self.settings.pruner)
        self.grid = spaces.grid(space) if samplers.is_grid(spec) else None
        if self.grid is not None:
            keys = list(self.grid)
            self.points = [dict(zip(keys, v, strict=True)) for v in _product(self.grid.values())]
        default = len(self.points) if self.grid is not None else 20
        self.target = self.settings.n_trials or default
        self.balanced = self._balanced(space)

    def _balanced(self, space: dict[str, Any]) -> tuple[str, list[Any]] | None:
        """The scientific parameter whose settings take turns, with its choices: the first
        categorical one of the space, in a one-objective study that is not a grid. Left to
        a sampler like TPE, a setting that started badly gets few trials, and the nuisance
        parameters are never tuned there (README: Reports, confounding)."""
        from optuna.distributions import CategoricalDistribution

        s = self.settings
        if not s.balance or self.grid is not None or len(s.objectives) > 1:
            return None
        for key in s.scientific:
            if isinstance(space.get(key), CategoricalDistribution):
                return key, list(space[key].choices)
        return None

    def _queue_next_setting(self) -> None:
        """Queue a trial at the setting of the balanced parameter with the fewest trials
        so far (every state counts: a rejected setting has had its turn), unless trials
        are already waiting (enqueue:, retries); under the storage's lock. A setting
        whose finished trials never had the nuisance parameters near the best trial's
        values gets those values (the rest the sampler's): each setting is tried where
        the others did best, so that it does not lose for want of tuning."""
        from optuna.trial import TrialState

        from cnnstudy.study.analysis import near

        if self.balanced is None:
            return
        key, choices = self.balanced
        trials = self.study.get_trials(deepcopy=False)
        if any(t.state == TrialState.WAITING for t in trials):
            return

        def value_of(trial: Any) -> str | None:
            value = trial.params.get(key, trial.system_attrs.get("fixed_params", {}).get(key))
            return None if value is None else spaces.override_value(value)

        values = [value_of(t) for t in trials]
        count = {spaces.override_value(c): 0 for c in choices}
        for value in values:
            if value in count:
                count[value] += 1
        setting = min(choices, key=lambda c: count[spaces.override_value(c)])  # first of ties
        label = spaces.override_value(setting)
        params: dict[str, Any] = {key: setting}
        attrs: dict[str, Any] = {"balanced": key}
        best = self._best()
        nuisance = [n for n in self.settings.nuisance if best is not None and n in best.params]
        here = [
            t
            for t, value in zip(trials, values, strict=True)
            if value == label
            and t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
            and REJECTED not in t.user_attrs
        ]
        if nuisance and here and value_of(best) != label:
            dists = best.distributions
            if not any(
                all(n in t.params and near(dists[n], t.params[n], best.params[n]) for n in nuisance)
                for t in here
            ):
                params.update({n: best.params[n] for n in nuisance})
                attrs["nuisance_from"] = best.number
        self.study.enqueue_trial(params, user_attrs=attrs)

    def _mark_dead_trials(self, study: Any) -> None:
        """RUNNING trials whose process is gone (this machine) or whose heartbeat stopped
        (any machine) are marked FAIL, with the reason; with `retry_failed`, their
        parameters are queued to run again."""
        import optuna
        from optuna.trial import TrialState

        from cnnstudy.run.lifecycle import gone

        storage = study._storage
        stale: set[int] = set()
        if _beating(study) is not None:
            # what optuna.storages.fail_stale_trials does, keeping the reason on the trial
            stale = set(storage._get_stale_trial_ids(study._study_id))
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            why = gone(trial.user_attrs)
            if not why and trial._trial_id in stale:
                host = trial.user_attrs.get("cnnstudy.host", "?")
                why = (
                    f"no heartbeat for over {3 * HEARTBEAT_S} s from process "
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
            retries = int(trial.user_attrs.get("retries", 0))
            if retries < self.settings.retry_failed and trial.params:
                study.enqueue_trial(
                    dict(trial.params),
                    user_attrs={"retries": retries + 1, "retry_of": trial.number},
                )

    def _parent_run(self, study: Any, space: dict[str, Any]) -> tuple[str, str, str]:
        """(tracking URI, experiment id, run id) of the study's MLflow parent run, created
        once and reused on resume."""
        import mlflow
        from mlflow.exceptions import MlflowException

        from cnnstudy.run import store
        from cnnstudy.run.lifecycle import process_tags

        cfg = _run_config(self.config)
        uri = store.tracking_uri(cfg)
        store.check_store(uri)
        experiment_id = store.open_experiment(
            uri, cfg.logger.experiment_name, cfg.logger.artifact_location
        )
        client = mlflow.MlflowClient(uri)
        run_id = study.user_attrs.get("cnnstudy.mlflow_parent_run_id")
        if run_id:
            try:
                client.update_run(run_id, status="RUNNING")
                return uri, experiment_id, run_id
            except MlflowException:
                pass  # the store was reset: a new parent run
        s = self.settings
        run = client.create_run(
            experiment_id,
            run_name=f"study {study.study_name}",
            tags={
                "cnnstudy.study": study.study_name,
                "cnnstudy.run_kind": "study",
                **process_tags(),
            },
        )
        params = {
            "study.name": study.study_name,
            "study.storage": redact_text(s.storage or DEFAULT_STORAGE),
            "study.n_trials": str(self.target),
            "study.objective": ",".join(s.objectives),
            "study.directions": ",".join(s.all_directions),
            "study.sampler": type(study.sampler).__name__,
            "study.pruner": type(study.pruner).__name__,
            "study.sampler_settings": redact_text(json.dumps(self.sampler_spec, default=str)),
            "study.pruner_settings": redact_text(json.dumps(self.pruner_spec, default=str)),
            "study.seeds": str(s.seeds),
            "study.search_space": spaces.describe(space)[:6000],
        }
        client.log_batch(
            run.info.run_id, params=[mlflow.entities.Param(k, v) for k, v in params.items()]
        )
        sweeper = OmegaConf.to_yaml(self.config.hydra.sweeper)
        client.log_text(run.info.run_id, redact_text(sweeper), "sweep.yaml")
        study.set_user_attr("cnnstudy.mlflow_parent_run_id", run.info.run_id)
        return uri, experiment_id, run.info.run_id

    # ------------------------------------------------------------------ trials

    def _job_config(self, overrides: list[str]) -> DictConfig:
        from hydra.errors import HydraException
        from omegaconf.errors import OmegaConfBaseException

        try:
            return self.loader.load_sweep_config(self.config, overrides)
        except (HydraException, OmegaConfBaseException) as err:
            raise ConfigError(str(err).strip().splitlines()[0]) from None

    def _run_trial(self, study: Any, trial: Any, overrides: list[str]) -> _Outcome:
        from cnnstudy.config.check import check
        from cnnstudy.run.context import RunRequest, requested

        started = time.perf_counter()
        try:
            job = self._job_config(overrides)
            check(_run_config(job))
        except ConfigError as err:
            trial.set_constraint(SHAPE_CONSTRAINT, 1.0)
            return _Outcome(
                "REJECTED",
                reason=f"rejected before training: {err}",
                seconds=time.perf_counter() - started,
            )
        trial.set_constraint(SHAPE_CONSTRAINT, 0.0)

        seed0 = int(job.seed)
        per_seed: list[list[float]] = []
        kept: list[dict[str, float]] = []
        run_ids: list[str] = []
        trial_run = self.parent_run_id
        if self.settings.seeds > 1:
            trial_run = self._trial_run(trial, overrides)
        for k in range(self.settings.seeds):
            request = RunRequest(
                parent_run_id=trial_run,
                run_name=self._run_name(trial, overrides, k if self.settings.seeds > 1 else None),
                tags={
                    "cnnstudy.study": study.study_name,
                    "cnnstudy.trial": str(trial.number),
                    "cnnstudy.run_kind": "trial" if self.settings.seeds == 1 else "seed",
                },
                callbacks=self._pruning(trial) if k == 0 else [],
            )
            seed = [f"seed={seed0 + k}"] if self.settings.seeds > 1 else []
            with requested(request):
                ret = self.launcher.launch([[*overrides, *seed]], initial_job_idx=self.job_idx)[0]
            self.job_idx += 1
            try:
                metrics = ret.return_value
            except Stopped as stop:
                return _Outcome(stop.state, reason=str(stop), seconds=time.perf_counter() - started)
            except Interrupted:
                raise
            except Exception as err:  # noqa: BLE001 -- the trial's failure, recorded
                return _Outcome("FAIL", reason=f"{type(err).__name__}: {err}")
            values = []
            for name in self.settings.objectives:
                value = (metrics or {}).get(name)
                if value is None or not math.isfinite(value):
                    return _Outcome("FAIL", reason=f"objective {name} is {value}")
                values.append(float(value))
            per_seed.append(values)
            kept.append({k: float(metrics[k]) for k in KEPT_METRICS if k in (metrics or {})})
            run_ids.append(request.run_id)
        means = [statistics.fmean(v[i] for v in per_seed) for i in range(len(per_seed[0]))]
        if self.settings.seeds > 1:
            trial.set_user_attr("seed_values", per_seed)
            trial.set_user_attr(
                "seed_std", [statistics.stdev(v[i] for v in per_seed) for i in range(len(means))]
            )
        return _Outcome(
            "COMPLETE",
            means,
            run_id=trial_run if self.settings.seeds > 1 else run_ids[0],
            seconds=time.perf_counter() - started,
            metrics={k: statistics.fmean(m[k] for m in kept) for k in kept[0]},
        )

    def _trial_run(self, trial: Any, overrides: list[str]) -> str:
        import mlflow

        client = mlflow.MlflowClient(self.uri)
        run = client.create_run(
            self.experiment_id,
            run_name=self._run_name(trial, overrides, None),
            tags={
                "mlflow.parentRunId": self.parent_run_id,
                "cnnstudy.trial": str(trial.number),
                "cnnstudy.run_kind": "trial",
            },
        )
        return run.info.run_id

    def _run_name(self, trial: Any, overrides: list[str], seed: int | None) -> str:
        varied = " ".join(f"{k}={spaces.override_value(v)}" for k, v in trial.params.items())
        name = f"trial {trial.number}: {varied}".strip()
        return (name if seed is None else f"{name} seed {seed}")[:250]

    def _pruning(self, trial: Any) -> list[Any]:
        import optuna

        if isinstance(self.study.pruner, optuna.pruners.NopPruner):
            return []
        from cnnstudy.study.pruning import PruneOnValidation

        return [PruneOnValidation(trial, self.settings.objectives[0])]

    def _finish(self, trial: Any, outcome: _Outcome) -> None:
        """Tell Optuna. A rejected architecture is told PRUNED with its shape constraint
        violated: samplers learn only from finished (complete or pruned) trials, and TPE
        ranks an infeasible one below every feasible one, so it learns to avoid the region.
        It does not count towards n_trials (user attribute `rejected`)."""
        from optuna.trial import TrialState

        if outcome.reason:
            key = {"FAIL": "fail_reason", "REJECTED": REJECTED}.get(outcome.state, "reason")
            trial.set_user_attr(key, outcome.reason)
        if outcome.run_id:
            trial.set_user_attr("mlflow_run_id", outcome.run_id)
        if outcome.metrics:  # what reports read: test accuracy, size, time
            trial.set_user_attr("metrics", outcome.metrics)
        if outcome.state == "COMPLETE":
            trial.set_user_attr("reproduce", self._command(trial))
        state = getattr(TrialState, "PRUNED" if outcome.state == "REJECTED" else outcome.state)
        if tell(self.study, trial, outcome.values if state == TrialState.COMPLETE else state):
            self.exhausted = True

    # ------------------------------------------------------------------ the loop

    def run(self, arguments: list[str]) -> list[Any]:
        import mlflow

        s = self.settings
        _check(s)
        self.arguments = arguments
        self.started = datetime.datetime.now()  # Optuna's own clock: naive local time
        file_params = [f"{k}={v}" for k, v in (s.params or {}).items()]
        space, fixed = spaces.parse([*file_params, *arguments])
        self._choose_sampler(space)
        if not space and self.grid is None:
            raise ConfigError(
                "the study has no search space: give hydra.sweeper.params in the sweep file "
                "or sweeps on the command line (model.hidden_units=int(interval(16, 512)))"
            )
        workers = []
        if s.n_jobs > 1:  # each process trains with its share of the cores
            threads = max(1, _cores() // s.n_jobs)
            fixed["trainer.num_threads"] = str(threads)
        self.fixed = [f"{k}={v}" for k, v in fixed.items()]
        self.study = study = self._study(space)
        self._mark_dead_trials(study)
        with store_lock(self.url):  # one parent run, one enqueue, however many processes
            self.uri, self.experiment_id, self.parent_run_id = self._parent_run(study, space)
            if not study.trials:
                for params in s.enqueue or []:
                    study.enqueue_trial(dict(params))
        client = mlflow.MlflowClient(self.uri)
        if s.n_jobs > 1 and not _is_worker():
            workers = _start_workers(s.n_jobs - 1, threads)
        print(
            f"study {study.study_name} in {redact_text(s.storage or DEFAULT_STORAGE)}: "
            f"{self._finished()} of {self.target} trials finished; MLflow parent run "
            f"{self.parent_run_id}",
            flush=True,
        )
        try:
            with signals_interrupt():
                self._trials(space, client)
        except BaseException as stop:
            _stop_workers(workers)
            if isinstance(stop, Interrupted):
                client.set_tag(self.parent_run_id, "cnnstudy.killed_reason", f"{stop}")
                client.set_terminated(self.parent_run_id, "KILLED")
            raise
        if _wait_for_workers(workers):
            raise ConfigError(
                "a worker process of the study failed (its output is above); run the same "
                "command to resume"
            )
        if _is_worker():
            return []  # the process that started the workers reports the study
        client.set_terminated(self.parent_run_id, "FINISHED")
        return self._summary(client)

    def _ask(self, space: dict[str, Any]) -> Any:
        """The next trial, or None when the study has its n_trials: the count and the ask
        happen under the storage's lock, so that processes working on one study run
        exactly n_trials in total. While other processes' trials could still fail, wait."""
        from optuna.trial import TrialState

        while True:
            with store_lock(self.url):
                finished = self._finished()
                running = len(self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
                if finished >= self.target:
                    return None
                more = finished + running < self.target
                if self.grid is not None:
                    pending = self._grid_pending()
                    if not pending and not running:
                        return None  # every combination tried in this command
                    more = more and pending
                if more:
                    self._queue_next_setting()
                    with warnings.catch_warnings():
                        # heartbeats are recorded here (_Heartbeat), not by study.optimize
                        warnings.filterwarnings("ignore", message="Heartbeat of storage")
                        return self.study.ask(fixed_distributions=space)
            time.sleep(1.0)
            raise_if_signalled()
            self._mark_dead_trials(self.study)

    def _trials(self, space: dict[str, Any], client: Any) -> None:
        from cnnstudy.run.lifecycle import process_tags

        s, study = self.settings, self.study
        while True:
            raise_if_signalled()  # between trials
            if self.failures >= s.max_failures:
                raise ConfigError(
                    f"hydra.sweeper.max_failures={s.max_failures}: {self.failures} trials "
                    "failed in this run of the study (reasons above and on each trial); "
                    "the study stops. Fix the cause and run the same command to resume"
                )
            asked = time.perf_counter()
            trial = None if self.exhausted else self._ask(space)
            if trial is None:
                return
            ask_s = time.perf_counter() - asked
            for key, value in process_tags().items():
                trial.set_user_attr(key, value)
            overrides = [
                *self.fixed,
                *(f"{k}={spaces.override_value(v)}" for k, v in trial.params.items()),
            ]
            with _Heartbeat(study, trial):
                try:
                    outcome = self._run_trial(study, trial, overrides)
                except Interrupted as stop:
                    self._finish(trial, _Outcome("FAIL", reason=f"stopped by {stop}"))
                    raise
            told = time.perf_counter()
            self._finish(trial, outcome)
            self.timings.append(
                {
                    "trial": trial.number,
                    "ask_s": ask_s,
                    "tell_s": time.perf_counter() - told,
                    "trial_s": outcome.seconds,
                }
            )
            if outcome.state == "FAIL":
                self.failures += 1
            self._report(trial, outcome, client)

    def _finished(self) -> int:
        """Complete or pruned trials, not counting rejected architectures."""
        from optuna.trial import TrialState

        done = (TrialState.COMPLETE, TrialState.PRUNED)
        trials = self.study.get_trials(deepcopy=False, states=done)
        return sum(REJECTED not in t.user_attrs for t in trials)

    # ------------------------------------------------------------------ grids

    def _point_trials(self) -> list[tuple[dict[str, Any], list[Any]]]:
        """Each combination of the grid with its trials."""
        by_params: dict[str, list[Any]] = {}
        for trial in self.study.get_trials(deepcopy=False):
            params = trial.params or trial.system_attrs.get("fixed_params", {})  # WAITING
            by_params.setdefault(_key(params), []).append(trial)
        return [(point, by_params.get(_key(point), [])) for point in self.points]

    def _grid_pending(self) -> int:
        """How many combinations still to try in this command (under the storage lock).
        One that failed in an earlier command is queued again (Optuna's grid sampler
        counts a failed combination as visited); one tried in this command waits for the
        next command."""
        from optuna.trial import TrialState

        pending = 0
        for point, trials in self._point_trials():
            states = {t.state for t in trials}
            if states & {TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING}:
                continue
            if TrialState.WAITING in states or not trials:
                pending += 1
                continue
            if all(t.datetime_start is None or t.datetime_start < self.started for t in trials):
                self.study.enqueue_trial(point, user_attrs={"retry": True})
                pending += 1
        return pending

    def _grid_unfinished(self) -> list[str]:
        """The combinations with no finished trial, each with its last reason."""
        from optuna.trial import TrialState

        unfinished = []
        for point, trials in self._point_trials():
            done = [
                t
                for t in trials
                if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
                and REJECTED not in t.user_attrs
            ]
            if done:
                continue
            last = trials[-1].user_attrs if trials else {}
            why = last.get(REJECTED) or last.get("fail_reason") or "not run"
            combination = " ".join(f"{k}={spaces.override_value(v)}" for k, v in point.items())
            unfinished.append(f"{combination} ({why})")
        return unfinished

    def _best(self) -> Any:
        from optuna.trial import TrialState

        complete = self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if not complete or len(self.settings.objectives) > 1:
            return None
        return self.study.best_trial

    def _pareto(self) -> list[Any]:
        """The Pareto front of a study with several objectives (complete trials)."""
        from optuna.trial import TrialState

        if len(self.settings.objectives) < 2:
            return []
        if not self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            return []
        return sorted(self.study.best_trials, key=lambda t: t.number)

    def _report(self, trial: Any, outcome: _Outcome, client: Any) -> None:
        best = self._best()
        value = "" if not outcome.values else " ".join(f"{v:.4f}" for v in outcome.values)
        line = f"trial {trial.number:>3} {outcome.state:<8} {value:>8}"
        if best is not None:
            line += f"  best {best.value:.4f} (trial {best.number})"
            client.log_metric(self.parent_run_id, "best/value", best.value, step=trial.number)
            client.set_tag(self.parent_run_id, "best.trial", str(best.number))
            client.set_tag(self.parent_run_id, "best.params", str(best.params)[:5000])
        front = self._pareto()
        if front:
            numbers = ",".join(str(t.number) for t in front)
            line += f"  Pareto front: trials {numbers}"
            client.set_tag(self.parent_run_id, "pareto.trials", numbers[:5000])
        line += f"  {outcome.seconds:.1f} s"
        if outcome.reason:
            line += f"  ({outcome.reason[:200]})"
        print(redact_text(line), flush=True)

    def _summary(self, client: Any) -> list[Any]:
        import yaml

        best = self._best()
        sweep_dir = Path(self.config.hydra.sweep.dir)
        results: dict[str, Any] = {
            "study": self.study.study_name,
            "storage": redact_text(self.settings.storage or DEFAULT_STORAGE),
            "mlflow_parent_run_id": self.parent_run_id,
            "trials": len(self.study.trials),
            "finished": self._finished(),
        }
        if best is not None:
            found = self._reproduction(best)
            results.update(
                {
                    "best_trial": best.number,
                    "best_value": best.value,
                    "best_params": found["params"],
                    "best_mlflow_run_id": found["mlflow_run_id"],
                    "reproduce": found["reproduce"],
                }
            )
            print(
                f"best: trial {best.number}, {self.settings.objectives[0]} {best.value:.4f}, "
                f"MLflow run {results['best_mlflow_run_id']}\nreproduce: {results['reproduce']}",
                flush=True,
            )
        front = self._pareto()
        if front:
            results["pareto_front"] = [self._reproduction(t) for t in front]
            print(f"Pareto front ({', '.join(self.settings.objectives)}):", flush=True)
            for entry in results["pareto_front"]:
                values = " ".join(f"{v:.4f}" for v in entry["values"])
                print(f"  trial {entry['trial']}: {values}  {entry['reproduce']}", flush=True)
        unfinished = self._grid_unfinished() if self.grid is not None else []
        if unfinished:
            results["unfinished"] = unfinished
        results["timings"] = self.timings
        sweep_dir.mkdir(parents=True, exist_ok=True)
        (sweep_dir / "results.yaml").write_text(yaml.safe_dump(results, sort_keys=False))
        experiment = client.get_run(self.parent_run_id).info.experiment_id
        if self.uri.startswith("http"):
            base = self.uri.rstrip("/")
        else:
            base = "http://127.0.0.1:5000"
        print(
            f"results: {sweep_dir / 'results.yaml'}\nthe study's runs: {base}/#/experiments/"
            f"{experiment}/runs/{self.parent_run_id}  (cnnstudy-ui serves them)",
            flush=True,
        )
        if self.settings.report:
            self._write_report(sweep_dir / "report")
        if unfinished:
            raise ConfigError(
                f"{len(unfinished)} of {len(self.points)} combinations did not finish: "
                f"{'; '.join(unfinished)}. The same command retries the failed ones "
                "(a rejected one "
                "fails again until its config changes)"
            )
        return [results]

    def _write_report(self, folder: Path) -> None:
        """The study's report (cnnstudy.study.report), logged to the parent run; a report
        that fails is said, and the study's results stand."""
        from cnnstudy.study.report import write_report

        try:
            page = write_report(self.study, folder, storage=self.url, tracking_uri=self.uri)
        except Exception as err:  # noqa: BLE001 -- the trials are stored; say what failed
            print(f"cnnstudy: the report failed: {type(err).__name__}: {err}", file=sys.stderr)
            return
        print(f"report: {page}", flush=True)

    def _command(self, trial: Any) -> str:
        """The cnnstudy-train command that trains this trial's configuration again."""
        params = [f"{k}={spaces.override_value(v)}" for k, v in trial.params.items()]
        return redact_text("cnnstudy-train " + " ".join([*self.fixed, *params]))

    def _reproduction(self, trial: Any) -> dict[str, Any]:
        command = self._command(trial)
        return {
            "trial": trial.number,
            "values": list(trial.values),
            "params": dict(trial.params),
            "mlflow_run_id": trial.user_attrs.get("mlflow_run_id", ""),
            "reproduce": command,
        }


def _beating(study: Any) -> Any:
    """The study's storage where it keeps heartbeats (a database; Optuna wraps it in a
    cache), or None (a journal file keeps none)."""
    from optuna.storages._heartbeat import BaseHeartbeat, is_heartbeat_enabled

    storage = study._storage
    if isinstance(storage, BaseHeartbeat) and is_heartbeat_enabled(storage):
        return storage
    return None


class _Heartbeat:
    """Records the trial's heartbeat in the storage while it runs: Optuna's own heartbeat
    runs only inside study.optimize, not with ask/tell."""

    def __init__(self, study: Any, trial: Any) -> None:
        self.study, self.trial = study, trial
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None

    def __enter__(self) -> _Heartbeat:
        storage = _beating(self.study)
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


# ---------------------------------------------------------------------------- workers

WORKER_ENV = "CNNSTUDY_STUDY_WORKER"


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _is_worker() -> bool:
    return os.environ.get(WORKER_ENV) == "1"


def _start_workers(count: int, threads: int) -> list[subprocess.Popen]:
    """`count` more processes running this same command, as study workers: each asks the
    storage for its next trial (no batches), trains with `threads` torch threads, and
    prints its own trial lines. Fresh interpreters, never a fork of this process (a
    process forked after torch has used OpenMP hangs)."""
    env = {**os.environ, WORKER_ENV: "1", "OMP_NUM_THREADS": str(threads)}
    command = [sys.argv[0], *sys.argv[1:], f"trainer.num_threads={threads}"]
    return [subprocess.Popen(command, env=env) for _ in range(count)]


def _stop_workers(workers: list[subprocess.Popen]) -> None:
    for worker in workers:
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
    for worker in workers:
        try:
            worker.wait(timeout=60)
        except subprocess.TimeoutExpired:
            worker.kill()


def _wait_for_workers(workers: list[subprocess.Popen]) -> bool:
    """Whether any worker failed."""
    return any(worker.wait() != 0 for worker in workers)
