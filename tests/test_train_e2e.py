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
    experiment = trained["run"].info.experiment_id  # a link, not a make target
    assert f"See it: http://127.0.0.1:5000/#/experiments/{experiment}/runs/{run_id}" in out


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

    from cnnstudy.config.compose import compose
    from cnnstudy.network.modules import build_network
    from cnnstudy.network.plan import plan

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

    def shift(by: float) -> None:
        with sqlite3.connect(db) as con:
            for table in ("metrics", "latest_metrics"):
                con.execute(
                    f"update {table} set value = value + ? where run_uuid = ? and key = 'test/acc'",
                    (by, run_id),
                )

    with sqlite3.connect(db) as con:
        saved = {
            table: con.execute(
                f"select value from {table} where run_uuid = ? and key = 'test/acc'", (run_id,)
            ).fetchone()[0]
            for table in ("metrics", "latest_metrics")
        }
    shift(0.001)
    try:
        bad = run_cli(
            "cnnstudy-reproduce",
            run_id,
            "--no-progress",
            cwd=where,
            env={"MLFLOW_TRACKING_URI": uri},
        )
    finally:  # the later tests reproduce the same run: its values exactly as they were
        with sqlite3.connect(db) as con:
            for table, value in saved.items():
                con.execute(
                    f"update {table} set value = ? where run_uuid = ? and key = 'test/acc'",
                    (value, run_id),
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


def test_run_records_the_network_that_trained_and_its_process(trained):
    run = trained["run"]
    params, tags = run.data.params, run.data.tags
    assert params["network.filters_per_stage"] == "[10]"
    assert params["network.stage_outputs"] == '["15x15x10"]'  # 3x3 conv on 32: 30, pooled 15
    assert params["network.hidden_units_per_layer"] == "[200]"
    assert params["network.params"] == str(int(run.data.metrics["model/params"]))
    assert (
        tags["cnnstudy.pid"].isdigit() and tags["cnnstudy.host"] and tags["cnnstudy.process_start"]
    )
    assert tags["cnnstudy.torch_threads"].isdigit()


def test_reproduce_uses_the_recorded_thread_count(trained):
    """The fused kernel's weight gradient depends on the thread count: reproduce trains
    with the one recorded, whatever this process's default (here 1 via OMP_NUM_THREADS)."""
    run = trained["run"]
    then = run.data.tags["cnnstudy.torch_threads"]
    done = run_cli(
        "cnnstudy-reproduce",
        run.info.run_id,
        "--no-progress",
        cwd=trained["where"],
        env={"MLFLOW_TRACKING_URI": trained["uri"], "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    client = trained["client"]
    (again,) = client.search_runs(
        [run.info.experiment_id],
        f"tags.`cnnstudy.reproduces` = '{run.info.run_id}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    assert again.data.tags["cnnstudy.torch_threads"] == then
    assert again.data.params["trainer.num_threads"] == then


def test_reproduce_reads_and_writes_the_store_it_is_given(trained, tmp_path):
    other = f"sqlite:///{tmp_path}/other.db"
    done = run_cli(
        "cnnstudy-reproduce",
        trained["run"].info.run_id,
        "--no-progress",
        "--tracking-uri",
        trained["uri"],
        cwd=trained["where"],
        env={"MLFLOW_TRACKING_URI": other},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert not (tmp_path / "other.db").exists()
    runs = trained["client"].search_runs(
        [trained["run"].info.experiment_id],
        f"tags.`cnnstudy.reproduces` = '{trained['run'].info.run_id}'",
    )
    assert runs and all(r.data.params["logger.tracking_uri"] == trained["uri"] for r in runs)


def test_reproduce_checks_the_data_before_training(trained):
    run_id, uri = trained["run"].info.run_id, trained["uri"]
    client = trained["client"]
    before = len(client.search_runs([trained["run"].info.experiment_id]))
    with sqlite3.connect(uri.removeprefix("sqlite:///")) as con:
        con.execute(
            "update tags set value = 'feedfacefeedface' where run_uuid = ? and key = ?",
            (run_id, "cnnstudy.data_fingerprint"),
        )
    try:
        done = run_cli(
            "cnnstudy-reproduce", run_id, cwd=trained["where"], env={"MLFLOW_TRACKING_URI": uri}
        )
    finally:
        with sqlite3.connect(uri.removeprefix("sqlite:///")) as con:
            con.execute(
                "update tags set value = ? where run_uuid = ? and key = ?",
                (
                    trained["run"].data.tags["cnnstudy.data_fingerprint"],
                    run_id,
                    "cnnstudy.data_fingerprint",
                ),
            )
    assert done.returncode == 1
    assert "data: DIFFERENT (fingerprint feedfacefeedface then" in done.stdout
    assert "not trained again" in done.stdout
    assert len(client.search_runs([trained["run"].info.experiment_id])) == before
