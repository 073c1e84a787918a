"""What a run records in MLflow: params (the config and the network it resolved to), tags,
run names, artifacts. Secrets are redacted (cnnstudy.redact); mlflow is imported where used.
"""

from __future__ import annotations

import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from cnnstudy.redact import override_secret, redact, redact_text


def plain_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as plain data, secrets redacted: what MLflow sees."""
    return redact(OmegaConf.to_container(cfg, resolve=True))


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)
    return flat


def run_name(cfg: DictConfig, overrides: list[str]) -> str:
    """Name a run after what was varied: the model, then the overrides that are not plumbing."""
    if cfg.logger.run_name:
        return cfg.logger.run_name
    plumbing = ("logger.", "trainer.progress_bar", "hydra.", "+logger.", "sweep=")
    varied = [override_secret(o) for o in overrides if not o.lstrip("~+").startswith(plumbing)]
    varied = [o for o in varied if not o.startswith("model=")]
    return " ".join([cfg.model.name, *varied])[:250]


def git_state(path: Path) -> tuple[str, str]:
    """(commit, dirty) of the repository holding `path`; ("unknown", "unknown") outside one."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(path), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        status = subprocess.run(
            ["git", "-C", str(path), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return commit, str(bool(status.strip())).lower()
    except (OSError, subprocess.CalledProcessError):
        return "unknown", "unknown"


PACKAGES = (
    "cnnstudy",
    "torch",
    "torchvision",
    "lightning",
    "hydra-core",
    "omegaconf",
    "mlflow",
    "optuna",
)


def run_tags(cfg: DictConfig, overrides: list[str], entry_point: str) -> dict[str, str]:
    commit, dirty = git_state(Path(__file__).resolve().parent)
    tags = {
        "mlflow.source.name": entry_point,
        "mlflow.source.type": "LOCAL",
        "mlflow.source.git.commit": commit,
        "cnnstudy.git_dirty": dirty,
        "cnnstudy.seed": str(cfg.seed),
        "cnnstudy.model": cfg.model.name,
        "cnnstudy.data": cfg.data.name,
        "cnnstudy.overrides": " ".join(override_secret(o) for o in overrides),
    }
    for package in PACKAGES:
        try:
            tags[f"cnnstudy.version.{package}"] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    tags.update({k: str(v) for k, v in redact(OmegaConf.to_container(cfg.logger.tags)).items()})
    return tags


def record_setup(
    cfg: DictConfig, layers: list, splits: Any, mean: list, std: list, uri: str
) -> None:
    """Log what a run starts from into the active MLflow run: config, data, architecture."""
    import json

    import mlflow
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.data.sources import CodeDatasetSource, LocalArtifactDatasetSource

    from cnnstudy.network.plan import architecture, totals
    from cnnstudy.network.table import describe, render
    from cnnstudy.run.store import serialized

    config = plain_config(cfg)
    params = flatten(config)
    for name, split in splits.items():
        params[f"data.{name}_size"] = str(len(split))
    params["data.train_mean"] = json.dumps([round(v, 4) for v in mean])
    params["data.train_std"] = json.dumps([round(v, 4) for v in std])
    params.update(architecture(layers))
    mlflow.log_params(params)
    mlflow.log_text(OmegaConf.to_yaml(OmegaConf.create(config)), "config.yaml")
    table = describe(cfg, layers)
    mlflow.log_text(render(table, layers), "describe.txt")
    mlflow.log_dict(table, "describe.json")
    counts = totals(layers)

    if splits.source.startswith("/"):
        source = LocalArtifactDatasetSource(redact_text(splits.source))
    else:
        source = CodeDatasetSource({"loader": splits.source})
    contexts = {"train": "training", "val": "validation", "test": "testing"}
    datasets = [
        MetaDataset(source, name=f"{cfg.data.name}-{name}", digest=split.fingerprint)
        for name, split in splits.items()
    ]
    # one request for the three; MLflow looks a dataset up, then inserts it: two runs
    # logging the same one at once would both insert (UNIQUE constraint failed: datasets)
    serialized(
        uri,
        lambda: mlflow.log_inputs(
            datasets=datasets,
            contexts=[contexts[name] for name, _ in splits.items()],
            tags_list=[None] * len(datasets),
        ),
    )
    mlflow.log_dict(
        {
            "classes": splits.classes,
            "sizes": {name: len(split) for name, split in splits.items()},
            "fingerprints": {name: split.fingerprint for name, split in splits.items()},
            "mean": mean,
            "std": std,
            "loaded_from": splits.loaded_from,
        },
        "data.json",
    )
    if splits.skipped:
        mlflow.log_text("\n".join(splits.skipped) + "\n", "skipped_images.txt")
    mlflow.log_metrics(  # one request
        {
            "model/params": counts["params"],
            "model/connections": counts["connections"],
            "time/data_load_s": splits.load_seconds,
        }
    )
