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

import collections
import datetime
import hashlib
import os
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from cnnstudy.errors import ConfigError, Interrupted
from cnnstudy.locks import store_lock
from cnnstudy.log import get as get_log
from cnnstudy.redact import redact_text
from cnnstudy.run.lifecycle import raise_if_signalled, signals_interrupt
from cnnstudy.study import jobs, samplers, workers
from cnnstudy.study import space as spaces
from cnnstudy.study.balance import Balance
from cnnstudy.study.faults import best_effort, explain
from cnnstudy.study.grid import Grid
from cnnstudy.study.parent import close_parent_run, open_parent_run
from cnnstudy.study.runs import end_trial_runs
from cnnstudy.study.settings import Settings, check, check_storage
from cnnstudy.study.standing import REJECTED, finished_count
from cnnstudy.study.storage import Heartbeat, mark_dead_trials, open_study, run_again
from cnnstudy.study.summary import duration, summarise, trial_line
from cnnstudy.study.trial import Outcome, Tracking, TrialRunner

log = get_log("study")


class StudyRunner:
    def __init__(self, settings: Settings, config: DictConfig, launcher: Any, loader: Any):
        self.settings = settings
        self.config = config
        self.launcher = launcher
        self.loader = loader
        self.failures = 0
        self.exhausted = False  # the sampler has covered its whole space
        self.timings: list[dict[str, float]] = []  # sampler and storage time per trial
        self.workers: list[Any] = []  # the n_jobs - 1 processes this one started
        self.rejected: list[str] = []  # reasons of the trials rejected in a row, up to now
        self.marked = 0  # trials of dead processes this process marked FAIL

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
            plain = plain and not any("interval(" in a for a in self.arguments)  # continuous
            try:
                spaces.grid(space)
            except ConfigError:
                plain = False
            spec = samplers.spec("sampler", "grid" if plain else "tpe")
        self.sampler_spec = spec
        self.pruner_spec = samplers.spec("pruner", self.settings.pruner)
        pruning = self.pruner_spec is not None and not str(
            self.pruner_spec.get("_target_", "")
        ).endswith("NopPruner")
        if pruning and len(self.settings.objectives) > 1:
            raise ConfigError(
                f"hydra.sweeper.pruner={self.settings.pruner}: Optuna cannot prune a study of "
                f"several objectives ({', '.join(self.settings.objectives)}); valid: no pruner "
                "(pruner: none), or one objective"
            )
        grid = spaces.grid(space) if samplers.is_grid(spec) else None
        self.grid = None if grid is None else Grid(grid, self.started)
        default = len(self.grid.points) if self.grid is not None else 20
        self.target = self.settings.n_trials or default
        self.balance = Balance.of(self.settings, space, grid=self.grid is not None)

    def _study(self, space: dict[str, Any]) -> Any:
        s = self.settings
        self.url = s.storage_url
        check_storage(self.url)
        study, joined = open_study(
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
            process=joined,
        )
        study.pruner = samplers.build_pruner(self.pruner_spec)
        return study

    # ------------------------------------------------------------------ the loop

    def run(self, arguments: list[str]) -> list[Any]:
        s = self.settings
        check(s)
        self.arguments = arguments
        # when this command started (Optuna's own clock: naive local time); a worker takes
        # its driver's or head's, so that "tried in this command" means the same in all
        given = os.environ.get(workers.STARTED_ENV) if workers.is_worker() else None
        self.started = datetime.datetime.fromisoformat(given) if given else datetime.datetime.now()
        file_params = [f"{k}={v}" for k, v in (s.params or {}).items()]
        space, fixed = spaces.parse([*file_params, *arguments])
        self._choose_sampler(space)
        if not space and self.grid is None:
            raise ConfigError(
                "the study has no search space: give hydra.sweeper.params in the sweep file "
                "or sweeps on the command line (model.hidden_units=int(interval(16, 512)))"
            )
        threads = 0
        if s.n_jobs > 1 and not jobs.is_submitit(self.config):  # each its share of the cores
            threads = max(1, workers.cores() // s.n_jobs)
            fixed["trainer.num_threads"] = str(threads)
        self.fixed = [f"{k}={v}" for k, v in fixed.items()]
        self.fixed_values = fixed
        self._check_before_the_first_trial(space)
        try:
            # a signal while the parent run is made is noted, and raised once it exists:
            # acted on at once, it would leave that run RUNNING, known to no one
            with signals_interrupt(preemption=jobs.in_job()):
                self._open(space)
        except Interrupted as err:
            self._close_parent(err)
            raise
        except ConfigError:
            raise
        except Exception as err:
            fault = self._fault(err)
            if fault is None:
                raise
            raise fault from None
        try:
            return self._run(space, threads)
        except BaseException as err:
            fault = None
            if isinstance(err, Exception) and not isinstance(err, ConfigError):
                fault = self._fault(err)
            self._close_parent(err, fault)
            if fault is not None:
                raise fault from None
            raise

    def _close_parent(self, err: BaseException, fault: ConfigError | None = None) -> None:
        """The parent run ended KILLED (a signal) or FAILED, where this process may end it:
        the parent run is the driver's; a worker ends it only when the driver is gone."""
        tracking = getattr(self, "tracking", None)
        closed = getattr(self, "parent_closed", False)  # FINISHED already: it stays
        if tracking is None or closed or (workers.is_worker() and not workers.driver_gone()):
            return
        stopped = isinstance(err, (Interrupted, KeyboardInterrupt))
        status = "KILLED" if stopped else "FAILED"
        why = _why(fault or err)
        best_effort(close_parent_run, tracking.uri, tracking.parent_run_id, status, why)

    def _fault(self, err: BaseException) -> ConfigError | None:
        from cnnstudy.run.store import tracking_uri
        from cnnstudy.study.parent import run_config

        tracking = tracking_uri(run_config(self.config))
        return explain(err, storage=self.settings.storage_url, tracking=tracking)

    def _open(self, space: dict[str, Any]) -> None:
        """The study in its storage, and its MLflow parent run."""
        s = self.settings
        self.study = study = self._study(space)
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
                for params in s.enqueue or []:  # a key fixed on the command line: its value
                    study.enqueue_trial(
                        {k: v for k, v in dict(params).items() if k in space},
                        user_attrs={"enqueued": True},  # the first: the report's baseline
                    )

    def _check_before_the_first_trial(self, space: dict[str, Any]) -> None:
        """What would fail every trial, or loop without end, said in seconds, before the
        study or its parent run exist: a key of the space or of `enqueue` that the
        config does not have, a value the config cannot take, sampler arguments the
        sampler cannot use."""
        s = self.settings
        if jobs.is_submitit(self.config):
            from cnnstudy.run.store import tracking_uri
            from cnnstudy.study.parent import run_config

            jobs.check(self.config, s.storage_url, tracking_uri(run_config(self.config)))
        check_storage(s.storage_url)
        _check_task(self.config, s.objectives)
        nodes = self.fixed_values.get("trainer.num_nodes", self.config.trainer.get("num_nodes", 1))
        if "trainer.num_nodes" in space or int(nodes) != 1:
            raise ConfigError(
                f"trainer.num_nodes={nodes}: a study's trial trains on one machine (its "
                "devices: trainer.devices=N); several machines train one run: srun ... "
                "cnnstudy-train trainer.num_nodes=M, without -m"
            )
        for params in s.enqueue or []:
            unknown = [k for k in dict(params) if k not in space and k not in self.fixed_values]
            if unknown:
                raise ConfigError(
                    f"hydra.sweeper.enqueue: {', '.join(unknown)} is not a parameter of the "
                    f"search space; it has: {', '.join(space) or 'none'}"
                )
        runner = TrialRunner(s, self.config, self.launcher, self.loader, self.fixed, None)
        for key, values in spaces.probe_values(space).items():
            for value in values:
                try:
                    runner.job_config([*self.fixed, f"{key}={spaces.override_value(value)}"])
                except ConfigError as err:
                    raise ConfigError(
                        f"hydra.sweeper.params: {key}={spaces.override_value(value)}: {err}"
                    ) from None
        samplers.try_sampler(
            self.sampler_spec,
            space,
            s.all_directions,
            grid=None if self.grid is None else self.grid.grid,
        )

    def _run(self, space: dict[str, Any], threads: int) -> list[Any]:
        import mlflow

        s, study, tracking = self.settings, self.study, self.tracking
        head = jobs.is_submitit(self.config) and not workers.is_worker()
        try:  # from here on the parent run exists: a signal is noted, raised at a safe point
            with signals_interrupt(preemption=jobs.in_job()):
                self._mark_dead_trials()
                self.trials = TrialRunner(
                    s, self.config, self.launcher, self.loader, self.fixed, tracking
                )
                client = mlflow.MlflowClient(tracking.uri)
                if s.n_jobs > 1 and not workers.is_worker() and not head:
                    from cnnstudy.config.check import device_count

                    per_trial = device_count(self.config.trainer.devices) or 1
                    self.workers = workers.start_workers(
                        s.n_jobs - 1, threads, per_trial, self.started
                    )
                if workers.is_worker():
                    workers.follow_driver()  # no worker outlives the command that started it
                log.info(
                    f"study {study.study_name} in {redact_text(self.url)}: "
                    f"{finished_count(study)} of {self.target} trials finished; MLflow "
                    f"parent run {tracking.parent_run_id}"
                )
                if head:
                    self._head(client)
                else:
                    self._loop(space, client)
        except BaseException:
            workers.stop_workers(self.workers)
            raise
        died = workers.wait_for_workers(self.workers)
        if workers.is_worker():
            return []  # the process that started the workers reports the study
        self._mark_dead_trials()  # a worker's trial, when it died mid-trial
        if died:
            told = "; its trial was marked FAIL" if self.marked else ""
            log.warning(f"cnnstudy: {died}{told}")
            if finished_count(study) < self.target:
                raise ConfigError(f"{died}; run the same command to resume the study")
        from cnnstudy.run.lifecycle import mark_orphans

        # every process of the study that comes here closes and describes the parent run:
        # one at a time (processes on other machines included)
        with store_lock(self.url):
            mark_orphans(tracking.uri, by=f"the study's driver (pid {os.getpid()})")
            close_parent_run(tracking.uri, tracking.parent_run_id, "FINISHED")
            self.parent_closed = True
            return self._summarise(client)

    def _summarise(self, client: Any) -> list[Any]:
        s, study, tracking = self.settings, self.study, self.tracking
        return summarise(
            study,
            settings=s,
            tracking=tracking,
            client=client,
            sweep_dir=Path(self.config.hydra.sweep.dir),
            fixed=self.fixed,
            timings=self.timings,
            grid=self.grid,
            storage_url=self.url,
        )

    def _head(self, client: Any) -> None:
        """The head of a study run by worker jobs (jobs.py): submit them, say each trial
        as it finishes, fail the trials of workers that died, until every job has ended."""
        import sys

        from optuna.trial import TrialState

        study = self.study
        if finished_count(study) >= self.target:
            return  # the same command again: only the summary
        said = {t.number for t in study.get_trials(deepcopy=False) if t.state.is_finished()}
        submitted = jobs.submit(
            self.config, sys.argv[1:], study.study_name, self.settings.n_jobs, self.started
        )

        def tick() -> None:
            self._mark_dead_trials()
            trials = study.get_trials(deepcopy=False)
            ended = sorted(
                (t for t in trials if t.state.is_finished()),
                key=lambda t: (t.datetime_complete or datetime.datetime.max, t.number),
            )
            for k, trial in enumerate(ended):
                if trial.number in said:
                    continue
                said.add(trial.number)
                done = finished_count(study, ended[: k + 1])
                state = trial.state.name
                reason = trial.user_attrs.get("fail_reason") or trial.user_attrs.get("reason")
                if REJECTED in trial.user_attrs:  # told PRUNED, with its reason (trial.py)
                    state, reason = "REJECTED", trial.user_attrs[REJECTED]
                seconds = 0.0
                if trial.datetime_complete and trial.datetime_start:
                    seconds = (trial.datetime_complete - trial.datetime_start).total_seconds()
                told = Outcome(
                    state,
                    values=list(trial.values) if trial.state == TrialState.COMPLETE else None,
                    reason=str(reason or ""),
                    seconds=seconds,
                )
                trial_line(study, trial, told, client, self.tracking, f"{done}/{self.target}")

        try:
            jobs.wait(submitted, tick)
        except BaseException:
            jobs.cancel(submitted)  # Ctrl-C of the head: its workers stop too
            raise
        tick()
        failed = jobs.failures(submitted)
        if failed and finished_count(study) < self.target:
            raise ConfigError(
                f"{failed}; {finished_count(study)} of {self.target} trials finished. The "
                "jobs' logs are in hydra.launcher.submitit_folder; run the same command to "
                "resume the study"
            )
        if failed:
            log.warning(f"cnnstudy: {failed}")

    def _progress(self) -> str:
        """`k/N` finished trials of the study, and the time left at this process's pace
        (its trials' mean time, shared among n_jobs processes)."""
        done = finished_count(self.study)
        text = f"{done}/{self.target}"
        seconds = [t["trial_s"] for t in self.timings]
        left = max(0, self.target - done)
        if left and seconds:
            eta = statistics.fmean(seconds) * left / max(1, self.settings.n_jobs)
            text += f"  ETA {duration(eta)}"
        return text

    def _mark_dead_trials(self) -> int:
        """Trials of processes that died are FAIL, their MLflow runs FAILED; how many."""
        tracking, name = self.tracking, self.study.study_name
        marked = []

        def ended(trial: Any, why: str) -> None:
            marked.append(trial.number)
            end_trial_runs(tracking, name, trial.number, "FAIL", why)

        workers.reap(self.workers)  # a dead worker's pid is gone, not a zombie's
        mark_dead_trials(self.study, self.settings.retry_failed, ended)
        self.marked += len(marked)
        return len(marked)

    def _ask(self, space: dict[str, Any]) -> Any:
        """The next trial, or None when the study has its n_trials: the count and the ask
        happen under the storage's lock, so that processes working on one study run
        exactly n_trials in total. While other processes' trials could still fail, wait."""
        from optuna.trial import TrialState

        study = self.study
        while True:
            with store_lock(self.url):
                # one read of the trials: counted in two, a trial told in between (tells
                # are not under the lock) would be in neither count, and one trial too many
                # would be asked
                trials = study.get_trials(deepcopy=False)
                finished = finished_count(study, trials)
                running = sum(t.state == TrialState.RUNNING for t in trials)
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
            self._mark_dead_trials()

    def _loop(self, space: dict[str, Any], client: Any) -> None:
        s, study = self.settings, self.study
        while True:
            raise_if_signalled()  # between trials
            if len(self.rejected) >= s.max_rejected:
                reason, times = collections.Counter(self.rejected).most_common(1)[0]
                raise ConfigError(
                    f"hydra.sweeper.max_rejected={s.max_rejected}: the last "
                    f"{len(self.rejected)} trials were all rejected by the shape check, "
                    f"{times} of them {reason.removeprefix('rejected before training: ')}. "
                    "Narrow the search space to networks that can exist "
                    "(cnnstudy-describe shows the arithmetic)"
                )
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
            with Heartbeat(study, trial):
                try:
                    outcome = self.trials.run(study, trial)
                except Interrupted as stop:
                    self.trials.finish(study, trial, Outcome("FAIL", reason=f"stopped by {stop}"))
                    if jobs.in_job():  # preempted, or at its time limit: the job is requeued
                        with store_lock(self.url):  # and the trial runs again, here or not
                            run_again(study, trial, preempted=True)
                    raise
                except Exception as err:  # a fault of a store: the trial FAIL, the study stops
                    fault = self._fault(err)
                    if fault is None:
                        raise
                    failed = Outcome("FAIL", reason=str(fault))
                    best_effort(self.trials.finish, study, trial, failed)
                    raise fault from None
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
            self.rejected = self.rejected + [outcome.reason] if outcome.state == "REJECTED" else []
            trial_line(study, trial, outcome, client, self.tracking, self._progress())


def _check_task(config: DictConfig, objectives: list[str]) -> None:
    """An objective the runs cannot log: an accuracy of a regression, an RMSE, MAE or R2
    of a classification."""
    from cnnstudy.study.parent import run_config

    data = config.data
    task = data.get("task")
    if data.name == "ucr" and task is None:
        from cnnstudy.config.check import series_from_files

        task = series_from_files(run_config(config)).data.task
    for name in objectives:
        if task == "regression" and name.endswith("/acc"):
            raise ConfigError(
                f"hydra.sweeper.objective={name}: a regression (data.task=regression) logs no "
                "accuracy; valid: val/rmse, val/mae, val/loss (direction=minimize), val/r2"
            )
        if task != "regression" and name.endswith(("/rmse", "/mae", "/r2")):
            raise ConfigError(
                f"hydra.sweeper.objective={name}: only a regression logs it; this data is a "
                f"classification (data.task={task}): val/acc or val/loss"
            )


def _why(err: BaseException) -> str:
    if workers.is_worker() and workers.driver_gone():
        return f"the study's driver (pid {workers.driver_pid()}) is gone; {err} in its worker"
    if isinstance(err, (ConfigError, Interrupted)):
        return str(err)
    if isinstance(err, SystemExit):
        return f"exit {err.code}"
    return f"{type(err).__name__}: {err}"
