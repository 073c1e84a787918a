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
"""

from __future__ import annotations

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
from cnnstudy.study import space as spaces

DEFAULT_STORAGE = "sqlite:///optuna.db"
HEARTBEAT_S = 20
SHAPE_CONSTRAINT = "shape_check"


@dataclass
class Settings:
    """hydra.sweeper.* (hydra_plugins.cnnstudy_sweeper.CnnstudySweeperConf), plain."""

    study_name: str | None = None
    storage: str | None = None
    n_trials: int = 20
    objective: Any = "val/acc"
    direction: Any = "maximize"
    directions: list[str] | None = None
    sampler: Any = None
    pruner: Any = None
    params: dict[str, str] = field(default_factory=dict)
    enqueue: list[dict[str, Any]] = field(default_factory=list)
    seeds: int = 1
    max_failures: int = 5
    n_jobs: int = 1
    max_failure_rate: float | None = None  # hydra-optuna-sweeper's key, accepted

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

    if settings.n_trials < 1:
        fail("n_trials", settings.n_trials, "must be at least 1")
    if settings.seeds < 1:
        fail("seeds", settings.seeds, "must be at least 1")
    if settings.n_jobs < 1:
        fail("n_jobs", settings.n_jobs, "must be at least 1")
    for name in settings.objectives:
        if not name.startswith(("val/", "train/")):
            fail(
                "objective",
                name,
                "a study selects on validation (or training) metrics, e.g. val/acc, val/loss; "
                "test metrics are reported, never selected on",
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
    return optuna.storages.RDBStorage(
        url, heartbeat_interval=HEARTBEAT_S, grace_period=3 * HEARTBEAT_S
    )


def _instantiate(node: Any, **extra: Any) -> Any:
    from hydra.utils import instantiate

    if node is None or (isinstance(node, (dict, DictConfig)) and not node.get("_target_")):
        return None
    return instantiate(node, **extra, _convert_="all")


@dataclass
class _Outcome:
    state: str  # COMPLETE, PRUNED, FAIL
    values: list[float] | None = None
    reason: str = ""
    run_id: str = ""
    seconds: float = 0.0


class StudyRunner:
    def __init__(self, settings: Settings, config: DictConfig, launcher: Any, loader: Any):
        self.settings = settings
        self.config = config
        self.launcher = launcher
        self.loader = loader
        self.job_idx = 0
        self.failures = 0
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
            if [d.name.lower() for d in study.directions] != s.all_directions:
                raise ConfigError(
                    f"hydra.sweeper.direction={s.all_directions}: study {name} was created "
                    f"with {[d.name.lower() for d in study.directions]}"
                )
        # the plugin hands plain data (Settings)
        sampler_cfg = OmegaConf.create(
            s.sampler or {"_target_": "optuna.samplers.TPESampler", "seed": 0}
        )
        extra: dict[str, Any] = {}
        if "seed" in sampler_cfg and sampler_cfg.seed is not None:
            # a rebuilt seeded sampler must not repeat the draws of the trials before it
            extra["seed"] = int(sampler_cfg.seed) + len(study.trials)
        if str(sampler_cfg.get("_target_", "")).endswith("GridSampler"):
            extra["search_space"] = spaces.grid(space)
        study.sampler = _instantiate(sampler_cfg, **extra)
        study.pruner = _instantiate(s.pruner) or optuna.pruners.NopPruner()
        return study

    def _default_name(self) -> str:
        choices = self.config.hydra.runtime.choices
        return str(choices.get("sweep") or "cnnstudy-study")

    def _mark_dead_trials(self, study: Any) -> None:
        """RUNNING trials whose process is gone (this machine) or whose heartbeat stopped
        (any machine) are marked FAIL, with the reason."""
        import optuna
        from optuna.trial import TrialState

        from cnnstudy.run.lifecycle import gone

        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            why = gone(trial.user_attrs)
            if why:
                study._storage.set_trial_user_attr(trial._trial_id, "fail_reason", why)
                study.tell(trial.number, state=TrialState.FAIL)
                print(f"trial {trial.number}: marked FAIL ({why})", flush=True)
        if isinstance(study._storage, optuna.storages.RDBStorage):
            optuna.storages.fail_stale_trials(study)

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
            "study.n_trials": str(s.n_trials),
            "study.objective": ",".join(s.objectives),
            "study.directions": ",".join(s.all_directions),
            "study.sampler": type(study.sampler).__name__,
            "study.pruner": type(study.pruner).__name__,
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
                "FAIL",
                reason=f"rejected before training: {err}",
                seconds=time.perf_counter() - started,
            )
        trial.set_constraint(SHAPE_CONSTRAINT, 0.0)

        seed0 = int(job.seed)
        per_seed: list[list[float]] = []
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
        from optuna.trial import TrialState

        if outcome.reason:
            trial.set_user_attr(
                "fail_reason" if outcome.state == "FAIL" else "reason", outcome.reason
            )
        if outcome.run_id:
            trial.set_user_attr("mlflow_run_id", outcome.run_id)
        state = getattr(TrialState, outcome.state)
        if state == TrialState.COMPLETE:
            self.study.tell(trial, outcome.values)
        else:
            self.study.tell(trial, state=state)

    # ------------------------------------------------------------------ the loop

    def run(self, arguments: list[str]) -> list[Any]:
        import mlflow

        s = self.settings
        _check(s)
        file_params = [f"{k}={v}" for k, v in (s.params or {}).items()]
        space, fixed = spaces.parse([*file_params, *arguments])
        if not space:
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
            f"{self._finished()} of {s.n_trials} trials finished; MLflow parent run "
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
                if finished >= self.settings.n_trials:
                    return None
                if finished + running < self.settings.n_trials:
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
            trial = self._ask(space)
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
            if outcome.state == "FAIL" and not outcome.reason.startswith("rejected"):
                self.failures += 1
            self._report(trial, outcome, client)

    def _finished(self) -> int:
        from optuna.trial import TrialState

        done = (TrialState.COMPLETE, TrialState.PRUNED)
        return len(self.study.get_trials(deepcopy=False, states=done))

    def _best(self) -> Any:
        from optuna.trial import TrialState

        complete = self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if not complete or len(self.settings.objectives) > 1:
            return None
        return self.study.best_trial

    def _report(self, trial: Any, outcome: _Outcome, client: Any) -> None:
        best = self._best()
        value = "" if not outcome.values else " ".join(f"{v:.4f}" for v in outcome.values)
        line = f"trial {trial.number:>3} {outcome.state:<8} {value:>8}"
        if best is not None:
            line += f"  best {best.value:.4f} (trial {best.number})"
            client.log_metric(self.parent_run_id, "best/value", best.value, step=trial.number)
            client.set_tag(self.parent_run_id, "best.trial", str(best.number))
            client.set_tag(self.parent_run_id, "best.params", str(best.params)[:5000])
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
            params = [f"{k}={spaces.override_value(v)}" for k, v in best.params.items()]
            command = "cnnstudy-train " + " ".join([*self.fixed, *params])
            results.update(
                {
                    "best_trial": best.number,
                    "best_value": best.value,
                    "best_params": dict(best.params),
                    "best_mlflow_run_id": best.user_attrs.get("mlflow_run_id", ""),
                    "reproduce": redact_text(command),
                }
            )
            print(
                f"best: trial {best.number}, {self.settings.objectives[0]} {best.value:.4f}, "
                f"MLflow run {results['best_mlflow_run_id']}\nreproduce: {results['reproduce']}",
                flush=True,
            )
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
        return [results]


class _Heartbeat:
    """Records the trial's heartbeat in the storage while it runs: Optuna's own heartbeat
    runs only inside study.optimize, not with ask/tell."""

    def __init__(self, study: Any, trial: Any) -> None:
        self.study, self.trial = study, trial
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None

    def __enter__(self) -> _Heartbeat:
        import optuna

        storage = self.study._storage
        if isinstance(storage, optuna.storages.RDBStorage):
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
