"""The study's MLflow parent run: created once, found again on resume, the landing page
of the study in the dashboard (its params, `sweep.yaml`, the best trial's tags)."""

from __future__ import annotations

import json
from typing import Any

from omegaconf import DictConfig, OmegaConf

from cnnstudy.redact import redact_text
from cnnstudy.study import space as spaces
from cnnstudy.study.settings import Settings

PARENT_ATTR = "cnnstudy.mlflow_parent_run_id"  # the study's user attribute naming it
STOP_TAGS = ("cnnstudy.killed_reason", "cnnstudy.stopped_reason")


def run_config(cfg: DictConfig) -> DictConfig:
    """A composed job config without its `hydra` node: what a run sees."""
    return OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])


def open_parent_run(
    study: Any,
    config: DictConfig,
    settings: Settings,
    space: dict[str, Any],
    *,
    target: int,
    sampler_spec: Any,
    pruner_spec: Any,
) -> tuple[str, str, str]:
    """(tracking URI, experiment id, run id) of the study's MLflow parent run, created
    once and reused on resume."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from cnnstudy.run import store
    from cnnstudy.run.lifecycle import process_tags

    cfg = run_config(config)
    uri = store.tracking_uri(cfg)
    store.check_store(uri)
    experiment_id = store.open_experiment(
        uri, cfg.logger.experiment_name, cfg.logger.artifact_location
    )
    client = mlflow.MlflowClient(uri)
    run_id = study.user_attrs.get(PARENT_ATTR)
    if run_id:
        try:
            client.update_run(run_id, status="RUNNING")
        except MlflowException:
            run_id = None  # the store was reset: a new parent run
    if run_id:
        run = client.get_run(run_id)
        for tag in STOP_TAGS:  # what an earlier run of the study ended with
            if tag in run.data.tags:
                client.delete_tag(run_id, tag)
        for key, value in process_tags().items():  # the process that holds it now
            client.set_tag(run_id, key, value)
        return uri, experiment_id, run_id
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
        "study.storage": redact_text(settings.storage_url),
        "study.n_trials": str(target),
        "study.objective": ",".join(settings.objectives),
        "study.directions": ",".join(settings.all_directions),
        "study.sampler": type(study.sampler).__name__,
        "study.pruner": type(study.pruner).__name__,
        "study.sampler_settings": redact_text(json.dumps(sampler_spec, default=str)),
        "study.pruner_settings": redact_text(json.dumps(pruner_spec, default=str)),
        "study.seeds": str(settings.seeds),
        "study.search_space": spaces.describe(space)[:6000],
    }
    client.log_batch(
        run.info.run_id, params=[mlflow.entities.Param(k, v) for k, v in params.items()]
    )
    sweeper = OmegaConf.to_yaml(config.hydra.sweeper)
    client.log_text(run.info.run_id, redact_text(sweeper), "sweep.yaml")
    study.set_user_attr(PARENT_ATTR, run.info.run_id)
    study.set_user_attr("cnnstudy.mlflow_experiment_id", experiment_id)  # report links
    return uri, experiment_id, run.info.run_id


def close_parent_run(uri: str, run_id: str, status: str, reason: str = "") -> None:
    """End the parent run: FINISHED, KILLED (a signal; `cnnstudy.killed_reason`) or
    FAILED (the study stopped on an error; `cnnstudy.stopped_reason`)."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    if status == "FINISHED":  # a worker's stop, before the study went on to its end
        for tag in STOP_TAGS:
            if tag in client.get_run(run_id).data.tags:
                client.delete_tag(run_id, tag)
    if reason:
        tag = STOP_TAGS[0] if status == "KILLED" else STOP_TAGS[1]
        client.set_tag(run_id, tag, redact_text(reason)[:5000])
    client.set_terminated(run_id, status)


def describe_parent_run(uri: str, run_id: str, note: str) -> None:
    """The parent run's description in the dashboard (MLflow's note, markdown)."""
    import mlflow

    mlflow.MlflowClient(uri).set_tag(run_id, "mlflow.note.content", redact_text(note))


def landing_note(study: Any, best: Any, answer: str, report: bool) -> str:
    """The parent run's description: the question, the answer, the best trial, and where
    the report is."""
    attrs = study.user_attrs
    question = attrs.get("cnnstudy.question") or f"Study {study.study_name}"
    objective = (attrs.get("cnnstudy.objective") or ["objective"])[0]
    lines = [f"**{question}**", ""]
    if answer:
        lines += [answer, ""]
    if best is not None:
        params = ", ".join(f"{k}={v}" for k, v in best.params.items())
        lines += [f"Best trial {best.number}: {objective} {best.values[0]:.4f} with {params}.", ""]
    if report:
        lines.append("The report: the artifact `report/index.html` of this run.")
    else:
        lines.append(f"No report yet: `cnnstudy-report '{study.study_name}'` writes it.")
    return "\n".join(lines)
