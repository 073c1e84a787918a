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
            return uri, experiment_id, run_id
        except MlflowException:
            pass  # the store was reset: a new parent run
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
    return uri, experiment_id, run.info.run_id
