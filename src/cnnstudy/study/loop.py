"""A study: Optuna's ask/tell loop over Hydra jobs, one MLflow parent run, resumable.

The sweeper plugin (hydra_plugins/cnnstudy_sweeper) hands `StudyRunner` its settings
(`hydra.sweeper.*`), the composed config, Hydra's launcher and config loader. The loop
asks for a trial under the storage's lock (so that every process working on the study
runs exactly `n_trials` in total), runs it (`trial.py`) and tells the outcome, until the
study has its `n_trials` finished trials; then the summary (`summary.py`).

Where things are: settings.py (the keys), storage.py (storage, heartbeats, dead trials),
parent.py (the MLflow parent run), trial.py (one trial), balance.py (balanced settings),
grid.py (plain multiruns), workers.py (n_jobs processes), summary.py (what is told).

Re-running the same command resumes: trials that finished (complete or pruned) count
towards `n_trials`; trials left RUNNING by a dead process are marked FAIL.
"""

from __future__ import annotations

import datetime
import hashlib
import time
import warnings
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from cnnstudy.errors import ConfigError, Interrupted
from cnnstudy.redact import redact_text
from cnnstudy.run.lifecycle import raise_if_signalled, signals_interrupt
from cnnstudy.run.store import store_lock
from cnnstudy.study import samplers, workers
from cnnstudy.study import space as spaces
from cnnstudy.study.balance import Balance
from cnnstudy.study.grid import Grid
from cnnstudy.study.parent import open_parent_run
from cnnstudy.study.settings import Settings, check
from cnnstudy.study.storage import Heartbeat, mark_dead_trials, open_study
from cnnstudy.study.summary import finished_count, summarise, trial_line
from cnnstudy.study.trial import Outcome, Tracking, TrialRunner


class StudyRunner:
    def __init__(self, settings: Settings, config: DictConfig, launcher: Any, loader: Any):
        self.settings = settings
        self.config = config
        self.launcher = launcher
        self.loader = loader
        self.failures = 0
        self.exhausted = False  # the sampler has covered its whole space
        self.timings: list[dict[str, float]] = []  # sampler and storage time per trial

    # ------------------------------------------------------------------ set-up

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
        grid = spaces.grid(space) if samplers.is_grid(spec) else None
        self.grid = None if grid is None else Grid(grid, self.started)
        default = len(self.grid.points) if self.grid is not None else 20
        self.target = self.settings.n_trials or default
        self.balance = Balance.of(self.settings, space, grid=self.grid is not None)

    def _study(self, space: dict[str, Any]) -> Any:
        s = self.settings
        self.url = s.storage_url
        study = open_study(
            self.url,
            s.study_name or self._default_name(),
            s.all_directions,
            {
                "search_space": spaces.describe(space),
                "objective": s.objectives,
                "question": s.question,  # what the study's report reads
                "scientific": list(s.scientific),
                "nuisance": list(s.nuisance),
                "seeds": s.seeds,
            },
        )
        study.sampler = samplers.build_sampler(
            self.sampler_spec,
            trials_before=len(study.trials),
            grid=None if self.grid is None else self.grid.grid,
        )
        study.pruner = samplers.build_pruner(self.pruner_spec)
        return study

    # ------------------------------------------------------------------ the loop

    def run(self, arguments: list[str]) -> list[Any]:
        import mlflow

        s = self.settings
        check(s)
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
        started: list[Any] = []
        if s.n_jobs > 1:  # each process trains with its share of the cores
            threads = max(1, workers.cores() // s.n_jobs)
            fixed["trainer.num_threads"] = str(threads)
        self.fixed = [f"{k}={v}" for k, v in fixed.items()]
        self.study = study = self._study(space)
        mark_dead_trials(study, s.retry_failed)
        with store_lock(self.url):  # one parent run, one enqueue, however many processes
            self.tracking = Tracking(
                *open_parent_run(
                    study,
                    self.config,
                    s,
                    space,
                    target=self.target,
                    sampler_spec=self.sampler_spec,
                    pruner_spec=self.pruner_spec,
                )
            )
            if not study.trials:
                for params in s.enqueue or []:
                    study.enqueue_trial(dict(params))
        self.trials = TrialRunner(
            s, self.config, self.launcher, self.loader, self.fixed, self.tracking
        )
        parent = self.tracking.parent_run_id
        client = mlflow.MlflowClient(self.tracking.uri)
        if s.n_jobs > 1 and not workers.is_worker():
            started = workers.start_workers(s.n_jobs - 1, threads)
        print(
            f"study {study.study_name} in {redact_text(self.url)}: "
            f"{finished_count(study)} of {self.target} trials finished; MLflow parent run "
            f"{parent}",
            flush=True,
        )
        try:
            with signals_interrupt():
                self._loop(space, client)
        except BaseException as stop:
            workers.stop_workers(started)
            if isinstance(stop, Interrupted):
                client.set_tag(parent, "cnnstudy.killed_reason", f"{stop}")
                client.set_terminated(parent, "KILLED")
            raise
        if workers.wait_for_workers(started):
            raise ConfigError(
                "a worker process of the study failed (its output is above); run the same "
                "command to resume"
            )
        if workers.is_worker():
            return []  # the process that started the workers reports the study
        client.set_terminated(parent, "FINISHED")
        return summarise(
            study,
            settings=s,
            tracking=self.tracking,
            client=client,
            sweep_dir=Path(self.config.hydra.sweep.dir),
            fixed=self.fixed,
            timings=self.timings,
            grid=self.grid,
            storage_url=self.url,
        )

    def _ask(self, space: dict[str, Any]) -> Any:
        """The next trial, or None when the study has its n_trials: the count and the ask
        happen under the storage's lock, so that processes working on one study run
        exactly n_trials in total. While other processes' trials could still fail, wait."""
        from optuna.trial import TrialState

        study = self.study
        while True:
            with store_lock(self.url):
                finished = finished_count(study)
                running = len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
                if finished >= self.target:
                    return None
                more = finished + running < self.target
                if self.grid is not None:
                    pending = self.grid.pending(study)
                    if not pending and not running:
                        return None  # every combination tried in this command
                    more = more and pending
                if more:
                    if self.balance is not None:
                        self.balance.queue_next(study)
                    with warnings.catch_warnings():
                        # heartbeats are recorded here (Heartbeat), not by study.optimize
                        warnings.filterwarnings("ignore", message="Heartbeat of storage")
                        return study.ask(fixed_distributions=space)
            time.sleep(1.0)
            raise_if_signalled()
            mark_dead_trials(study, self.settings.retry_failed)

    def _loop(self, space: dict[str, Any], client: Any) -> None:
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
            with Heartbeat(study, trial):
                try:
                    outcome = self.trials.run(study, trial)
                except Interrupted as stop:
                    self.trials.finish(study, trial, Outcome("FAIL", reason=f"stopped by {stop}"))
                    raise
            told = time.perf_counter()
            if self.trials.finish(study, trial, outcome):
                self.exhausted = True
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
            trial_line(study, trial, outcome, client, self.tracking)
