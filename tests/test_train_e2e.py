"""The real entry points end to end: train -> MLflow run -> reproduce, in tiny budgets."""

from __future__ import annotations

import sqlite3
import subprocess
from pathlib import Path

import mlflow
import pytest

from .conftest import run_cli, train_cli

pytestmark = pytest.mark.slow

SECRET_PASSWORD = "hunter2-pw"
SECRET_TOKEN = "tok-9f8e7d"


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """One short run through cnnstudy-train, with secrets in its config."""
    where = tmp_path_factory.mktemp("train")
    result, (run,) = train_cli(
        where,
        "trainer.max_epochs=2",
        "trainer.progress_bar=false",
        "model.receptive_field=3",
        # MLFLOW_TRACKING_URI wins over this; the password must still never be stored
        f"logger.tracking_uri=postgresql://alice:{SECRET_PASSWORD}@db.example:5432/mlflow",
        f"+logger.tags.api_token={SECRET_TOKEN}",
        "+logger.tags.team=vision",
    )
    uri = f"sqlite:///{where}/mlflow.db"
    client = mlflow.MlflowClient(uri)
    return {"where": where, "uri": uri, "client": client, "run": run, "stdout": result.stdout}


def test_summary_names_accuracy_params_time_and_run(trained):
    out = trained["stdout"]
    run_id = trained["run"].info.run_id
    assert "test/acc" in out and "params" in out and " s\n" in out and run_id in out


def test_run_holds_metrics_per_epoch_and_final(trained):
    client, run = trained["client"], trained["run"]
    metrics = run.data.metrics
    for name in ("train/loss", "train/acc", "val/loss", "val/acc"):
        assert len(client.get_metric_history(run.info.run_id, name)) == 2, name
    for name in (
        "test/loss",
        "test/acc",
        "model/params",
        "model/connections",
        "train/images_per_s",
    ):
        assert name in metrics, name
    assert metrics["model/params"] == 10 * (3 * 3 + 1) + (15 * 15 * 10 + 1) * 200 + 2010
    assert 0.5 < metrics["test/acc"] <= 1.0  # two epochs on digits learn something real
    assert metrics["train/images_per_s"] > 0


def test_run_holds_resolved_config_as_params_and_artifact(trained):
    run = trained["run"]
    params = run.data.params
    assert params["model.receptive_field"] == "3"
    assert params["trainer.max_epochs"] == "2"
    assert params["optimizer._target_"] == "torch.optim.Adam"
    assert (
        int(params["data.train_size"])
        + int(params["data.val_size"])
        + int(params["data.test_size"])
        == 1797
    )
    config = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/config.yaml")
    assert "receptive_field: 3" in config
    describe = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/describe.txt")
    assert "floor((32 - 3 + 2*0) / 1) + 1 = 30" in describe
    table = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/describe.json")
    assert table["params"] == run.data.metrics["model/params"]


def test_run_holds_the_trained_model(trained):
    import numpy as np
    import torch

    from cnnstudy.network.plan import plan
    from cnnstudy.config.compose import compose
    from cnnstudy.network.modules import build_network

    run = trained["run"]
    (logged,) = mlflow.search_logged_models(
        experiment_ids=[run.info.experiment_id], output_format="list"
    )
    assert logged.source_run_id == run.info.run_id
    exported = mlflow.pytorch.load_model(logged.model_uri)
    x = torch.randn(3, 1, 32, 32)
    # the state dict beside it rebuilds the same network from the stored config
    cfg = compose(["model.receptive_field=3"])
    net = build_network(plan(cfg.model, cfg.data)).eval()
    path = mlflow.artifacts.download_artifacts(f"runs:/{run.info.run_id}/weights/state_dict.pt")
    net.load_state_dict(torch.load(path, weights_only=True))
    np.testing.assert_allclose(exported(x).detach().numpy(), net(x).detach().numpy(), atol=1e-5)


def test_run_tags_name_commit_versions_seed_and_overrides(trained):
    tags = trained["run"].data.tags
    # the tests run in a checkout: its commit and state (test_package covers an install)
    head = subprocess.run(
        ["git", "-C", str(Path(__file__).parent), "rev-parse", "HEAD"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    assert tags["mlflow.source.git.commit"] == head and len(head) == 40
    assert tags["cnnstudy.git_dirty"] in ("true", "false")
    assert tags["cnnstudy.seed"] == "0"
    assert tags["cnnstudy.version.torch"] and tags["cnnstudy.version.lightning"]
    assert "model.receptive_field=3" in tags["cnnstudy.overrides"]
    assert tags["team"] == "vision"
    assert (
        trained["run"].info.run_name == "seed_example trainer.max_epochs=2 model.receptive_field=3"
    )


def test_secrets_appear_nowhere_in_the_run(trained):
    run = trained["run"]
    seen = [str(run.data.params), str(run.data.tags), str(run.data.metrics), run.info.run_name]
    root = Path(trained["where"]) / "mlartifacts"
    seen += [p.read_bytes().decode("latin-1") for p in root.rglob("*") if p.is_file()]
    db = Path(trained["uri"].removeprefix("sqlite:///"))
    seen.append(db.read_bytes().decode("latin-1"))
    with sqlite3.connect(db) as con:  # the pages above may be compressed or split; ask SQL too
        for (table,) in con.execute("select name from sqlite_master where type='table'"):
            seen.append(str(con.execute(f"select * from {table}").fetchall()))
    blob = "\n".join(seen)
    assert SECRET_PASSWORD not in blob and SECRET_TOKEN not in blob
    # the store that was used is recorded, not the config's (MLFLOW_TRACKING_URI won)
    assert run.data.params["logger.tracking_uri"] == trained["uri"]
    assert run.data.tags["api_token"] == "***"


def test_reproduce_matches_then_detects_a_changed_metric(trained):
    run_id, where, uri = trained["run"].info.run_id, trained["where"], trained["uri"]
    ok = run_cli(
        "cnnstudy-reproduce", run_id, "--no-progress", cwd=where, env={"MLFLOW_TRACKING_URI": uri}
    )
    assert ok.returncode == 0, ok.stdout[-3000:] + ok.stderr[-3000:]
    assert "MATCH: all" in ok.stdout
    for metric in ("test/acc", "val/loss", "train/acc"):
        assert metric in ok.stdout

    db = uri.removeprefix("sqlite:///")
    with sqlite3.connect(db) as con:
        for table in ("metrics", "latest_metrics"):
            con.execute(
                f"update {table} set value = value + 0.001 where run_uuid = ? and key = 'test/acc'",
                (run_id,),
            )
    bad = run_cli(
        "cnnstudy-reproduce", run_id, "--no-progress", cwd=where, env={"MLFLOW_TRACKING_URI": uri}
    )
    assert bad.returncode == 1
    assert "MISMATCH in 1 metric(s): test/acc" in bad.stdout


def test_reproduce_unknown_run_is_a_clear_error(trained):
    result = run_cli(
        "cnnstudy-reproduce",
        "0" * 32,
        cwd=trained["where"],
        env={"MLFLOW_TRACKING_URI": trained["uri"]},
    )
    assert result.returncode == 2
    assert "not found" in result.stderr and "Traceback" not in result.stderr
