"""A study's MLflow runs below its parent: one run per trial, one per seed below it.

Every run ends in the state its Optuna trial ends in: COMPLETE is FINISHED, PRUNED is
KILLED (tag `cnnstudy.trial_state=PRUNED`), FAIL is FAILED (tag `cnnstudy.fail_reason`),
and a trial stopped by a signal is KILLED (tag `cnnstudy.killed_reason`). With `seeds`
> 1 the trial's run holds the trial's parameters, its config, and the mean over seeds
of every metric (`val/acc`, ...) with their spread (`seed_std/val/acc`, ...), so that
trials sort and compare on their objective in the dashboard like plain runs.
"""

from __future__ import annotations

import statistics
from typing import Any

from cnnstudy.redact import redact_text
from cnnstudy.study import space as spaces

MLFLOW_STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}
REASON_TAGS = {"PRUNED": "cnnstudy.stopped_reason", "FAIL": "cnnstudy.fail_reason"}
SPREAD = "seed_std/"  # prefix of a trial run's seed standard deviation of a metric


def short_value(value: Any) -> str:
    """A value as a run name shows it: floats to 4 significant digits (the exact value
    is in the run's params)."""
    if isinstance(value, float):
        return f"{value:.4g}"
    return spaces.override_value(value)


def run_name(trial: Any, seed: int | None = None) -> str:
    """`trial N: key=value ...`, each key by its last part where that is unambiguous."""
    keys = list(trial.params)
    last = [k.rsplit(".", 1)[-1] for k in keys]
    shown = [
        f"{short if last.count(short) == 1 else key}={short_value(trial.params[key])}"
        for key, short in zip(keys, last, strict=True)
    ]
    name = f"trial {trial.number}: {' '.join(shown)}".strip().rstrip(":")
    return (name if seed is None else f"{name} seed {seed}")[:250]


def open_trial_run(tracking: Any, study: Any, trial: Any, job: Any, seeds: list[int]) -> str:
    """The run of a trial of several seeds, below the parent run: tagged like a plain
    trial run (study, trial, process), with the job's config as params and config.yaml
    (seed: the first one; `seeds` lists them all)."""
    import mlflow
    from omegaconf import OmegaConf

    from cnnstudy.run.lifecycle import process_tags
    from cnnstudy.run.tracking import flatten, plain_config
    from cnnstudy.study.parent import run_config

    client = mlflow.MlflowClient(tracking.uri)
    run = client.create_run(
        tracking.experiment_id,
        run_name=run_name(trial),
        tags={
            "mlflow.parentRunId": tracking.parent_run_id,
            "cnnstudy.study": study.study_name,
            "cnnstudy.trial": str(trial.number),
            "cnnstudy.run_kind": "trial",
            "cnnstudy.seeds": " ".join(str(s) for s in seeds),
            **process_tags(),
        },
    )
    config = plain_config(run_config(job))
    params = {**flatten(config), "seeds": " ".join(str(s) for s in seeds)}
    client.log_batch(
        run.info.run_id,
        params=[mlflow.entities.Param(k, redact_text(v)[:6000]) for k, v in params.items()],
    )
    client.log_text(run.info.run_id, OmegaConf.to_yaml(OmegaConf.create(config)), "config.yaml")
    return run.info.run_id


def log_seed_means(uri: str, run_id: str, per_seed: list[dict[str, float]]) -> dict[str, float]:
    """The mean over seeds of every metric all seeds logged, and its standard deviation
    as `seed_std/NAME`, on the trial's run; the means."""
    import mlflow

    names = [k for k in per_seed[0] if all(k in m for m in per_seed)]
    means = {k: statistics.fmean(m[k] for m in per_seed) for k in names}
    spread = {f"{SPREAD}{k}": statistics.stdev(m[k] for m in per_seed) for k in names}
    if len(per_seed) < 2:
        spread = {}
    metrics = [mlflow.entities.Metric(k, v, 0, 0) for k, v in {**means, **spread}.items()]
    client = mlflow.MlflowClient(uri)
    for start in range(0, len(metrics), 500):
        client.log_batch(run_id, metrics=metrics[start : start + 500])
    return means


def end_runs(uri: str, run_ids: list[str], state: str, reason: str = "") -> None:
    """End each run in the MLflow status of the trial's `state` (COMPLETE, PRUNED, FAIL,
    or KILLED for a signal), with the state and reason as tags."""
    ids = list(dict.fromkeys(r for r in run_ids if r))
    if not ids:
        return
    import mlflow

    client = mlflow.MlflowClient(uri)
    status = MLFLOW_STATUS.get(state, "KILLED")
    for run_id in ids:
        client.set_tag(run_id, "cnnstudy.trial_state", state if state in MLFLOW_STATUS else "FAIL")
        if reason:
            tag = REASON_TAGS.get(state, "cnnstudy.killed_reason")
            client.set_tag(run_id, tag, redact_text(reason)[:5000])
        client.set_terminated(run_id, status)


def end_trial_runs(tracking: Any, study_name: str, number: int, state: str, reason: str) -> None:
    """End the runs of trial `number` (its own and its seeds') in `state`, wherever their
    process was: a trial marked FAIL by another process (its process died, or its
    heartbeat stopped). A run that finished before its process died without telling the
    study ends FAILED too: its trial is FAIL."""
    import mlflow

    client = mlflow.MlflowClient(tracking.uri)
    found = client.search_runs(
        [tracking.experiment_id],
        f"tags.`cnnstudy.trial` = '{number}' and attributes.status != '{MLFLOW_STATUS[state]}'",
        max_results=1000,
    )
    ids = [
        r.info.run_id
        for r in found
        if r.data.tags.get("cnnstudy.study") == study_name and r.info.status != "KILLED"
    ]
    end_runs(tracking.uri, ids, state, reason)
