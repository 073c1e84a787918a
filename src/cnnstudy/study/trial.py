"""One trial: its config checked, its seeds trained as MLflow runs, its outcome told.

1. The job's config is composed and shape-checked: a network that cannot exist is
   rejected in milliseconds, recorded with its reason, and marked infeasible
   (`trial.set_constraint`) so that constraint-aware samplers learn to avoid it.
2. The job runs `seeds` times (one per seed) through Hydra's launcher, as child runs of
   the study's MLflow parent run (with seeds > 1, of the trial's own run), the first
   with a pruning callback when a pruner is set.
3. Optuna is told the objective: the validation metric(s) `objective` names, the mean
   over seeds, never a test metric.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig

from cnnstudy.errors import ConfigError, Interrupted, Stopped
from cnnstudy.redact import redact_text
from cnnstudy.study import space as spaces
from cnnstudy.study.parent import run_config
from cnnstudy.study.settings import Settings

SHAPE_CONSTRAINT = "shape_check"
REJECTED = "rejected"  # user attribute of a trial whose network failed the shape check
KEPT_METRICS = ("val/acc", "val/loss", "test/acc", "test/loss", "model/params", "time/fit_s")


@dataclass
class Outcome:
    state: str  # COMPLETE, PRUNED, FAIL, REJECTED
    values: list[float] | None = None
    reason: str = ""
    run_id: str = ""
    seconds: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)  # mean over seeds


@dataclass
class Tracking:
    """Where the study's runs go: the MLflow store, experiment and parent run."""

    uri: str
    experiment_id: str
    parent_run_id: str


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


def reproduce_command(fixed: list[str], trial: Any) -> str:
    """The cnnstudy-train command that trains this trial's configuration again."""
    params = [f"{k}={spaces.override_value(v)}" for k, v in trial.params.items()]
    return redact_text("cnnstudy-train " + " ".join([*fixed, *params]))


class TrialRunner:
    """Runs the study's trials as Hydra jobs through its launcher."""

    def __init__(
        self,
        settings: Settings,
        config: DictConfig,
        launcher: Any,
        loader: Any,
        fixed: list[str],
        tracking: Tracking,
    ) -> None:
        self.settings, self.config = settings, config
        self.launcher, self.loader = launcher, loader
        self.fixed, self.tracking = fixed, tracking
        self.job_idx = 0

    def overrides(self, trial: Any) -> list[str]:
        return [
            *self.fixed,
            *(f"{k}={spaces.override_value(v)}" for k, v in trial.params.items()),
        ]

    def _job_config(self, overrides: list[str]) -> DictConfig:
        from hydra.errors import HydraException
        from omegaconf.errors import OmegaConfBaseException

        try:
            return self.loader.load_sweep_config(self.config, overrides)
        except (HydraException, OmegaConfBaseException) as err:
            raise ConfigError(str(err).strip().splitlines()[0]) from None

    def run(self, study: Any, trial: Any) -> Outcome:
        from cnnstudy.config.check import check
        from cnnstudy.run.context import RunRequest, requested

        overrides = self.overrides(trial)
        started = time.perf_counter()
        try:
            job = self._job_config(overrides)
            check(run_config(job))
        except ConfigError as err:
            trial.set_constraint(SHAPE_CONSTRAINT, 1.0)
            return Outcome(
                "REJECTED",
                reason=f"rejected before training: {err}",
                seconds=time.perf_counter() - started,
            )
        trial.set_constraint(SHAPE_CONSTRAINT, 0.0)

        seeds = self.settings.seeds
        seed0 = int(job.seed)
        per_seed: list[list[float]] = []
        kept: list[dict[str, float]] = []
        run_ids: list[str] = []
        trial_run = self.tracking.parent_run_id
        if seeds > 1:
            trial_run = self._trial_run(trial)
        for k in range(seeds):
            request = RunRequest(
                parent_run_id=trial_run,
                run_name=run_name(trial, k if seeds > 1 else None),
                tags={
                    "cnnstudy.study": study.study_name,
                    "cnnstudy.trial": str(trial.number),
                    "cnnstudy.run_kind": "trial" if seeds == 1 else "seed",
                },
                callbacks=self._pruning(study, trial) if k == 0 else [],
            )
            seed = [f"seed={seed0 + k}"] if seeds > 1 else []
            with requested(request):
                ret = self.launcher.launch([[*overrides, *seed]], initial_job_idx=self.job_idx)[0]
            self.job_idx += 1
            try:
                metrics = ret.return_value
            except Stopped as stop:
                return Outcome(stop.state, reason=str(stop), seconds=time.perf_counter() - started)
            except Interrupted:
                raise
            except Exception as err:  # noqa: BLE001 -- the trial's failure, recorded
                return Outcome("FAIL", reason=f"{type(err).__name__}: {err}")
            values = []
            for name in self.settings.objectives:
                value = (metrics or {}).get(name)
                if value is None or not math.isfinite(value):
                    return Outcome("FAIL", reason=f"objective {name} is {value}")
                values.append(float(value))
            per_seed.append(values)
            kept.append({k: float(metrics[k]) for k in KEPT_METRICS if k in (metrics or {})})
            run_ids.append(request.run_id)
        means = [statistics.fmean(v[i] for v in per_seed) for i in range(len(per_seed[0]))]
        if seeds > 1:
            trial.set_user_attr("seed_values", per_seed)
            trial.set_user_attr(
                "seed_std", [statistics.stdev(v[i] for v in per_seed) for i in range(len(means))]
            )
        return Outcome(
            "COMPLETE",
            means,
            run_id=trial_run if seeds > 1 else run_ids[0],
            seconds=time.perf_counter() - started,
            metrics={k: statistics.fmean(m[k] for m in kept) for k in kept[0]},
        )

    def _trial_run(self, trial: Any) -> str:
        import mlflow

        client = mlflow.MlflowClient(self.tracking.uri)
        run = client.create_run(
            self.tracking.experiment_id,
            run_name=run_name(trial, None),
            tags={
                "mlflow.parentRunId": self.tracking.parent_run_id,
                "cnnstudy.trial": str(trial.number),
                "cnnstudy.run_kind": "trial",
            },
        )
        return run.info.run_id

    def _pruning(self, study: Any, trial: Any) -> list[Any]:
        import optuna

        if isinstance(study.pruner, optuna.pruners.NopPruner):
            return []
        from cnnstudy.study.pruning import PruneOnValidation

        return [PruneOnValidation(trial, self.settings.objectives[0])]

    def finish(self, study: Any, trial: Any, outcome: Outcome) -> bool:
        """Tell Optuna; whether the sampler has exhausted its space. A rejected
        architecture is told PRUNED with its shape constraint violated: samplers learn
        only from finished (complete or pruned) trials, and TPE ranks an infeasible one
        below every feasible one, so it learns to avoid the region. It does not count
        towards n_trials (user attribute `rejected`)."""
        from optuna.trial import TrialState

        if outcome.reason:
            key = {"FAIL": "fail_reason", "REJECTED": REJECTED}.get(outcome.state, "reason")
            trial.set_user_attr(key, outcome.reason)
        if outcome.run_id:
            trial.set_user_attr("mlflow_run_id", outcome.run_id)
        if outcome.metrics:  # what reports read: test accuracy, size, time
            trial.set_user_attr("metrics", outcome.metrics)
        if outcome.state == "COMPLETE":
            trial.set_user_attr("reproduce", reproduce_command(self.fixed, trial))
        state = getattr(TrialState, "PRUNED" if outcome.state == "REJECTED" else outcome.state)
        return tell(study, trial, outcome.values if state == TrialState.COMPLETE else state)


def run_name(trial: Any, seed: int | None) -> str:
    varied = " ".join(f"{k}={spaces.override_value(v)}" for k, v in trial.params.items())
    name = f"trial {trial.number}: {varied}".strip()
    return (name if seed is None else f"{name} seed {seed}")[:250]
