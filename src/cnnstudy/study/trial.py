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

import contextlib
import io
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig

from cnnstudy.errors import ConfigError, Diverged, Interrupted, Stopped
from cnnstudy.log import get as get_log
from cnnstudy.redact import redact_text
from cnnstudy.study import space as spaces
from cnnstudy.study.faults import best_effort, explain
from cnnstudy.study.parent import run_config
from cnnstudy.study.runs import end_runs, log_seed_means, open_trial_run, run_name
from cnnstudy.study.settings import Settings
from cnnstudy.study.standing import REJECTED, best_trial

SHAPE_CONSTRAINT = "shape_check"
log = get_log("study")
KEPT_METRICS = (
    "val/acc",
    "val/loss",
    "test/acc",
    "test/loss",
    "val/rmse",
    "val/mae",
    "val/r2",
    "test/rmse",
    "test/mae",
    "test/r2",
    "model/params",
    "time/fit_s",
)


@dataclass
class Outcome:
    state: str  # COMPLETE, PRUNED, FAIL, REJECTED
    values: list[float] | None = None
    reason: str = ""
    run_id: str = ""
    seconds: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)  # mean over seeds
    per_seed: list[dict[str, float]] = field(default_factory=list)  # every metric, each seed
    runs: list[str] = field(default_factory=list)  # MLflow runs that end in its state
    attrs: dict[str, Any] = field(default_factory=dict)  # more user attributes of the trial


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


def _compose_once(loader: Any) -> None:
    """Hydra composes a trial's config from the files for every job (about 0.1 s here: a
    dozen YAML files parsed again, the defaults tree built again), although within a
    study only the trial's values change. Here the config is composed from the files once
    per choice of config groups (the command's own and any the trial's overrides choose),
    and each trial's config is a copy of it with the trial's value overrides applied, as
    Hydra applies them after composing: the same config, `hydra.overrides.task` and
    `hydra.job.override_dirname` included (tests/test_study.py compares them). The
    launcher then takes the config composed for the shape check with the same overrides,
    which nothing else holds."""
    if loader is None or getattr(loader, "cnnstudy_compose_once", False):
        return
    import copy

    from hydra._internal.config_loader_impl import ConfigLoaderImpl, get_overrides_dirname
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    compose = loader.load_sweep_config
    parser = OverridesParser.create()
    composed: dict[tuple[str, ...], Any] = {}  # group choices -> the config they compose
    kept: dict[tuple[str, ...], Any] = {}  # the last config made, until it is taken

    def chooses_files(override: Any) -> bool:
        # as Hydra's defaults list sorts them: a group's option, or any hydra.* override
        if override.is_hydra_override() or override.key_or_group.startswith("hydra"):
            return True
        value = override.value()
        return not isinstance(value, dict) and loader.repository.group_exists(override.key_or_group)

    def from_copy(master_config: Any, sweep_overrides: list[str]) -> Any:
        parsed = parser.parse_overrides(overrides=list(sweep_overrides))
        choices = [o for o in parsed if chooses_files(o)]
        values = [o for o in parsed if not chooses_files(o)]
        key = tuple(
            [*OmegaConf.to_container(master_config.hydra.overrides.hydra)]
            + [o.input_line for o in choices]
        )
        if key not in composed:
            if len(composed) >= 16:  # a study chooses among a few groups' options at most
                composed.clear()
            composed[key] = compose(master_config, [o.input_line for o in choices])
        config = copy.deepcopy(composed[key])
        ConfigLoaderImpl._apply_overrides_to_config(values, config)
        task = [o for o in parsed if not o.is_hydra_override()]
        named = config.hydra.job.config.override_dirname
        config.hydra.overrides.task = [o.input_line for o in task]
        config.hydra.job.override_dirname = get_overrides_dirname(
            overrides=task,
            kv_sep=named.kv_sep,
            item_sep=named.item_sep,
            exclude_keys=named.exclude_keys,
        )
        OmegaConf.copy_cache(from_config=master_config, to_config=config)
        return config

    def load_sweep_config(master_config: Any, sweep_overrides: list[str]) -> Any:
        key = tuple(sweep_overrides)
        if key in kept:
            return kept.pop(key)
        kept.clear()
        kept[key] = from_copy(master_config, sweep_overrides)
        return kept[key]

    loader.load_sweep_config = load_sweep_config
    loader.cnnstudy_compose_once = True


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
        tracking: Tracking | None,
    ) -> None:
        self.settings, self.config = settings, config
        self.launcher, self.loader = launcher, loader
        self.fixed, self.tracking = fixed, tracking
        self.job_idx = 0
        _compose_once(loader)

    def overrides(self, trial: Any) -> list[str]:
        return [
            *self.fixed,
            *(f"{k}={spaces.override_value(v)}" for k, v in trial.params.items()),
        ]

    def job_config(self, overrides: list[str]) -> DictConfig:
        from hydra.errors import HydraException
        from omegaconf.errors import OmegaConfBaseException

        try:
            return self.loader.load_sweep_config(self.config, overrides)
        except (HydraException, OmegaConfBaseException) as err:
            lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
            said = lines[0] if len(lines) < 2 else f"{lines[0]} {lines[-1]}"
            raise ConfigError(said) from None

    def run(self, study: Any, trial: Any) -> Outcome:
        from cnnstudy.config.check import check

        overrides = self.overrides(trial)
        started = time.perf_counter()
        try:
            job = self.job_config(overrides)
            check(run_config(job))
        except ConfigError as err:
            trial.set_constraint(SHAPE_CONSTRAINT, 1.0)
            return Outcome(
                "REJECTED",
                reason=f"rejected before training: {err}",
                seconds=time.perf_counter() - started,
            )
        trial.set_constraint(SHAPE_CONSTRAINT, 0.0)

        seeds = [int(job.seed) + k for k in range(self.settings.seeds)]
        trial_run = ""
        if len(seeds) > 1:
            trial_run = open_trial_run(self.tracking, study, trial, job, seeds)
            trial.set_user_attr("mlflow_run_id", trial_run)
        try:
            outcome = self._seeds(study, trial, overrides, seeds, trial_run)
        except Interrupted as stop:
            end_runs(self.tracking.uri, [trial_run], "KILLED", f"{stop} during the trial")
            raise
        except Exception as err:  # a store's fault (loop.py says it): its run ends too
            best_effort(end_runs, self.tracking.uri, [trial_run], "FAIL", str(err)[:500])
            raise
        outcome.seconds = time.perf_counter() - started
        if trial_run and outcome.state == "COMPLETE":
            log_seed_means(self.tracking.uri, trial_run, outcome.per_seed)
        outcome.runs = [*outcome.runs, trial_run]
        outcome.run_id = trial_run or next(iter(outcome.runs), "")
        end_runs(self.tracking.uri, outcome.runs, outcome.state, outcome.reason)
        return outcome

    def _seeds(
        self, study: Any, trial: Any, overrides: list[str], seeds: list[int], trial_run: str
    ) -> Outcome:
        """Each seed's job in turn, below the trial's run (or the parent's, one seed)."""
        from cnnstudy.run.context import RunRequest, requested

        several = len(seeds) > 1
        per_seed: list[dict[str, float]] = []
        run_ids: list[str] = []
        for k, seed in enumerate(seeds):
            request = RunRequest(
                parent_run_id=trial_run or self.tracking.parent_run_id,
                run_name=run_name(trial, k if several else None),
                tags={
                    "cnnstudy.study": study.study_name,
                    "cnnstudy.trial": str(trial.number),
                    "cnnstudy.run_kind": "seed" if several else "trial",
                },
                callbacks=self._pruning(study, trial) if k == 0 else [],
                pictures_if=self._new_best(study) if k == 0 else None,
            )
            job = [*overrides, f"seed={seed}"] if several else overrides
            with requested(request):
                ret = self.launcher.launch([job], initial_job_idx=self.job_idx)[0]
            self.job_idx += 1
            runs = [request.run_id]
            try:
                with contextlib.redirect_stderr(io.StringIO()):  # Hydra's "Error executing
                    metrics = ret.return_value or {}  # job" line: the trial line says why
            except Stopped as stop:
                return Outcome(stop.state, reason=str(stop), runs=runs)
            except Interrupted:
                raise
            except Diverged as err:
                return Outcome("FAIL", reason=str(err), runs=runs)
            except Exception as err:  # noqa: BLE001 -- the trial's failure, recorded
                if explain(err, storage=self.settings.storage_url, tracking=self.tracking.uri):
                    raise  # a store's fault, not the trial's: the study stops (loop.py)
                return Outcome("FAIL", reason=f"{type(err).__name__}: {err}", runs=runs)
            for name in self.settings.objectives:
                value = metrics.get(name)
                if value is None or not math.isfinite(value):
                    return Outcome("FAIL", reason=f"objective {name} is {value}", runs=runs)
            per_seed.append({k: float(v) for k, v in metrics.items()})
            run_ids.append(request.run_id)
        objectives = self.settings.objectives
        values = [[m[name] for name in objectives] for m in per_seed]
        means = [statistics.fmean(v[i] for v in values) for i in range(len(objectives))]
        attrs: dict[str, Any] = {}
        if several:  # told with the outcome (_tell), not before: the trial may be FAIL by then
            attrs["seed_values"] = values
            attrs["seed_std"] = [statistics.stdev(v[i] for v in values) for i in range(len(means))]
        kept = [{k: m[k] for k in KEPT_METRICS if k in m} for m in per_seed]
        return Outcome(
            "COMPLETE",
            means,
            run_id=trial_run or run_ids[0],
            metrics={k: statistics.fmean(m[k] for m in kept) for k in kept[0]},
            per_seed=per_seed,
            runs=[] if several else run_ids,
            attrs=attrs,
        )

    def _new_best(self, study: Any) -> Any:
        """Whether a run's metrics beat the study's best so far: its pictures are logged
        then (the sweeps turn per-run pictures off for speed), so that the best network's
        filters and confusion matrix are a click away. One objective only."""

        if len(self.settings.objectives) > 1:
            return None
        name = self.settings.objectives[0]
        best = best_trial(study)
        current = None if best is None else best.value
        sign = 1 if self.settings.all_directions[0] == "maximize" else -1

        def beats(metrics: dict[str, float]) -> bool:
            value = metrics.get(name)
            if value is None or not math.isfinite(value):
                return False
            return current is None or sign * (value - current) > 0

        return beats

    def _pruning(self, study: Any, trial: Any) -> list[Any]:
        """The objective reported to the trial after every validation epoch (Optuna's
        intermediate values, in optuna-dashboard too), and the pruner asked."""
        from cnnstudy.study.pruning import PruneOnValidation

        if len(self.settings.objectives) > 1:
            return []  # Optuna keeps intermediate values for one objective only
        return [PruneOnValidation(trial, self.settings.objectives[0])]

    def finish(self, study: Any, trial: Any, outcome: Outcome) -> bool:
        """Tell Optuna; whether the sampler has exhausted its space. A rejected
        architecture is told PRUNED with its shape constraint violated: samplers learn
        only from finished (complete or pruned) trials, and TPE ranks an infeasible one
        below every feasible one, so it learns to avoid the region. It does not count
        towards n_trials (user attribute `rejected`).

        A trial that another process marked FAIL while this one was stalled (its
        heartbeat went stale) stays FAIL: this process says so and goes on."""
        import optuna

        try:
            return self._tell(study, trial, outcome)
        except optuna.exceptions.UpdateFinishedTrialError:
            log.warning(
                f"trial {trial.number}: another process marked it FAIL while this one ran it "
                f"(its heartbeat went stale); its {outcome.state} outcome is not told to Optuna"
            )
            end_runs(self.tracking.uri, outcome.runs, "FAIL", "marked FAIL by another process")
            return False

    def _tell(self, study: Any, trial: Any, outcome: Outcome) -> bool:
        from optuna.trial import TrialState

        if outcome.reason:
            key = {"FAIL": "fail_reason", "REJECTED": REJECTED}.get(outcome.state, "reason")
            trial.set_user_attr(key, outcome.reason)
        if outcome.run_id:
            trial.set_user_attr("mlflow_run_id", outcome.run_id)
        if outcome.metrics:  # what reports read: test accuracy, size, time
            trial.set_user_attr("metrics", outcome.metrics)
        for key, value in outcome.attrs.items():
            trial.set_user_attr(key, value)
        if outcome.state == "COMPLETE":
            trial.set_user_attr("reproduce", reproduce_command(self.fixed, trial))
        state = getattr(TrialState, "PRUNED" if outcome.state == "REJECTED" else outcome.state)
        return tell(study, trial, outcome.values if state == TrialState.COMPLETE else state)
