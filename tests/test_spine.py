"""train() as a library call (repeatable, nothing global left behind), multirun, the UI."""

from __future__ import annotations

import random
import socket
import subprocess
import sys
import time
import urllib.request

import mlflow
import pytest

from cnnstudy.config.compose import compose

from .conftest import BIN, run_cli, train_cli

pytestmark = pytest.mark.slow


def test_two_calls_in_one_process_give_the_same_run_and_leave_no_state(tmp_path, monkeypatch):
    import numpy as np
    import torch

    from cnnstudy.run.train import is_timing, train

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = compose(
        [
            "trainer=smoke",
            "trainer.limit_train_batches=4",
            f"logger.tracking_uri=sqlite:///{tmp_path}/m.db",
            f"logger.artifact_location={tmp_path}/a",
            "logger.log_model=false",
            "trainer.num_threads=1",
        ]
    )
    threads = torch.get_num_threads()
    torch.manual_seed(123)
    random.seed(123)
    np.random.seed(123)
    expected = (torch.rand(1).item(), random.random(), np.random.rand())
    torch.manual_seed(123)
    random.seed(123)
    np.random.seed(123)

    first = train(cfg)
    second = train(cfg)

    assert first.run_id != second.run_id
    client = mlflow.MlflowClient(first.tracking_uri)
    runs = [client.get_run(r.run_id) for r in (first, second)]
    # each run says where its own data came from, and how long that took
    assert runs[0].data.tags["cnnstudy.data_loaded_from"] in ("decoded", "cache")
    assert runs[1].data.tags["cnnstudy.data_loaded_from"] == "memory"
    assert all(run.data.metrics["time/data_load_s"] >= 0 for run in runs)
    assert {k: v for k, v in first.metrics.items() if not is_timing(k)} == {
        k: v for k, v in second.metrics.items() if not is_timing(k)
    }
    assert (torch.rand(1).item(), random.random(), np.random.rand()) == expected
    assert torch.get_num_threads() == threads
    assert not torch.are_deterministic_algorithms_enabled()
    assert torch.utils.deterministic.fill_uninitialized_memory
    # the one setting left on, on purpose: denormal floats flush to zero (README)
    assert (torch.tensor([1e-30]) * torch.tensor([1e-10])).item() == 0.0


def test_multirun_sweeps_a_scalar_key_one_run_each(tmp_path):
    result, all_runs = train_cli(
        tmp_path,
        "-m",
        "trainer=smoke",
        "model.receptive_field=3,7",
        f"hydra.sweeper.storage=sqlite:///{tmp_path}/optuna.db",
    )
    (parent,) = [r for r in all_runs if r.data.tags.get("cnnstudy.run_kind") == "study"]
    runs = [r for r in all_runs if r is not parent]
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {parent.info.run_id}
    # every job alike: logging the first job's model imports pytorch_lightning, which used to
    # move Lightning's messages past cnnstudy's filter for the jobs after it
    printed = result.stdout + result.stderr
    assert "`Trainer.fit` stopped" not in printed  # a study prints a line per trial
    for noise in ("GPU available", "TPU available", "litlogger", "estimate number of stepping"):
        assert noise not in printed, noise
    assert sorted(r.data.params["model.receptive_field"] for r in runs) == ["3", "7"]
    assert sorted(r.data.metrics["model/params"] for r in runs) == [
        10 * 50 + (13 * 13 * 10 + 1) * 200 + 2010,
        10 * 10 + (15 * 15 * 10 + 1) * 200 + 2010,
    ]
    names = sorted(r.info.run_name for r in runs)  # the grid's order is Optuna's
    assert [n.split(": ")[0] for n in names] == ["trial 0", "trial 1"]
    assert sorted(n.split(": ")[1] for n in names) == [  # a key by its last part
        "receptive_field=3",
        "receptive_field=7",
    ]
    assert sorted(r.data.params["network.stage_outputs"] for r in runs) == [
        '["13x13x10"]',
        '["15x15x10"]',
    ]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ui_links_to_the_runs_table_and_serves_on_localhost(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.MlflowClient(uri).create_experiment("cnnstudy", artifact_location=f"{tmp_path}/a")
    experiment_id = mlflow.MlflowClient(uri).get_experiment_by_name("cnnstudy").experiment_id
    port = _free_port()
    printed = run_cli(
        "cnnstudy-ui",
        "--print-only",
        "--port",
        str(port),
        cwd=tmp_path,
        env={"MLFLOW_TRACKING_URI": uri},
    )
    link = f"http://127.0.0.1:{port}/#/experiments/{experiment_id}/runs"
    assert link in printed.stdout

    server = subprocess.Popen(
        [str(BIN / "cnnstudy-ui"), "--port", str(port)],
        cwd=tmp_path,
        env={"PATH": str(BIN), "MLFLOW_TRACKING_URI": uri, "HOME": str(tmp_path)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    assert r.status == 200
                    break
            except OSError:
                assert server.poll() is None, server.stdout.read().decode()[-2000:]
                assert time.monotonic() < deadline, "MLflow UI did not start in 90 s"
                time.sleep(0.5)
        listening = subprocess.run(
            ["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True
        ).stdout
        local = {line.split()[3].rsplit(":", 1)[0] for line in listening.splitlines()}
        if local:  # ss is there: every listening socket on the port is on loopback
            assert local == {"127.0.0.1"}, listening
    finally:
        import os
        import signal

        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def test_ui_without_runs_says_what_to_do_and_creates_no_store(tmp_path):
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/m.db"}
    result = run_cli("cnnstudy-ui", "--print-only", cwd=tmp_path, env=env)
    assert result.returncode == 2
    assert "no such file" in result.stderr and "make demo" in result.stderr
    assert not (tmp_path / "m.db").exists()
    mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"]).search_experiments()  # a store, no runs
    result = run_cli(
        "cnnstudy-ui", "--print-only", "logger.experiment_name=x", cwd=tmp_path, env=env
    )
    assert result.returncode == 2
    assert "no such experiment" in result.stderr and "make demo" in result.stderr


def test_ui_on_a_taken_port_says_so_and_fails(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.MlflowClient(uri).create_experiment("cnnstudy", artifact_location=f"{tmp_path}/a")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli(
            "cnnstudy-ui", "--port", str(port), cwd=tmp_path, env={"MLFLOW_TRACKING_URI": uri}
        )
    assert result.returncode == 2
    assert f"--port {port}" in result.stderr and "--port 5001" in result.stderr


def test_reproduce_creates_no_store_where_there_is_none(tmp_path):
    result = run_cli("cnnstudy-reproduce", "0" * 32, cwd=tmp_path)
    assert result.returncode == 2 and "no such file" in result.stderr
    assert list(tmp_path.iterdir()) == []


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))


def test_a_sweep_goes_on_past_an_invalid_job_and_exits_non_zero(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    result = run_cli(
        "cnnstudy-train",
        "-m",
        "trainer=smoke",
        "logger.log_model=false",
        "model.receptive_field=40,3",
        f"logger.artifact_location={tmp_path}/a",
        f"hydra.sweeper.storage=sqlite:///{tmp_path}/optuna.db",
        cwd=tmp_path,
        env={"MLFLOW_TRACKING_URI": uri},
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "1 of 2 combinations did not finish: model.receptive_field=40 (rejected" in (
        result.stderr
    )
    assert "model.receptive_field=40: conv1" in result.stderr
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("cnnstudy").experiment_id])
    (run,) = [r for r in runs if r.data.tags.get("cnnstudy.run_kind") == "trial"]
    assert run.data.params["model.receptive_field"] == "3"


def test_the_basic_sweeper_stays_available_and_goes_on_past_an_invalid_job(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    result = run_cli(
        "cnnstudy-train",
        "-m",
        "hydra/sweeper=basic",
        "trainer=smoke",
        "logger.log_model=false",
        "model.receptive_field=40,3",
        f"logger.artifact_location={tmp_path}/a",
        cwd=tmp_path,
        env={"MLFLOW_TRACKING_URI": uri},
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "1 job(s) of the sweep failed" in result.stderr
    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("cnnstudy").experiment_id])
    assert run.data.params["model.receptive_field"] == "3"
    assert not (tmp_path / "optuna.db").exists()


def test_bf16_mixed_precision_trains_through_the_precision_plugin(tmp_path, monkeypatch):
    """Overridden precision goes through Lightning's plugin (autocast forward,
    manual_backward, optimizer step); here on the CPU, where bf16 autocast exists too."""
    import math

    from cnnstudy.run.train import train

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = compose(
        [
            "trainer=smoke",
            "trainer.precision=bf16-mixed",
            "trainer.channels_last=false",
            "trainer.cpu_kernels=false",
            f"logger.tracking_uri=sqlite:///{tmp_path}/m.db",
            f"logger.artifact_location={tmp_path}/a",
            "logger.log_model=false",
        ]
    )
    result = train(cfg)
    run = mlflow.MlflowClient(result.tracking_uri).get_run(result.run_id)
    assert run.data.tags["cnnstudy.precision"] == "bf16-mixed"
    assert run.data.tags["cnnstudy.channels_last"] == "false"
    assert run.data.tags["cnnstudy.cpu_kernels"] == "off"
    assert math.isfinite(result.metrics["train/loss"])
    assert math.isfinite(result.metrics["test/loss"])
    cfg.trainer.precision = "32-true"
    full = train(cfg)
    assert full.metrics["train/loss"] != result.metrics["train/loss"]  # bf16 really ran


def test_the_progress_bar_shows_loss_and_accuracy_not_a_version(tmp_path, monkeypatch):
    from cnnstudy.run import train as run_train
    from cnnstudy.run.classifier import RunProgressBar

    shown: list[dict] = []
    original = RunProgressBar.get_metrics

    def watched(self, *args):
        shown.append(original(self, *args))
        return shown[-1]

    monkeypatch.setattr(RunProgressBar, "get_metrics", watched)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = compose(
        [
            "trainer=smoke",
            "trainer.progress_bar=true",
            "trainer.max_epochs=2",  # per-epoch metrics: the second epoch shows the first's
            f"logger.tracking_uri=sqlite:///{tmp_path}/m.db",
            f"logger.artifact_location={tmp_path}/a",
            "logger.log_model=false",
        ]
    )
    run_train.train(cfg)
    seen = set().union(*shown)
    assert {"train/loss", "train/acc", "val/loss", "val/acc"} <= seen
    assert "v_num" not in seen


def test_a_studys_config_shows_with_cfg_and_every_command_runs_as_python_m(tmp_path):
    shown = run_cli("cnnstudy-train", "-m", "sweep=hidden_units", "--cfg", "hydra", cwd=tmp_path)
    assert shown.returncode == 0 and "Traceback" not in shown.stderr, shown.stderr[-2000:]
    assert "study_name: hidden_units" in shown.stdout and "-m dropped" in shown.stderr
    assert not (tmp_path / "optuna.db").exists()
    python = str(BIN / "python")
    table = subprocess.run(
        [python, "-m", "cnnstudy", "describe"], cwd=tmp_path, capture_output=True, text=True
    )
    assert table.returncode == 0 and "394,470" in table.stdout, table.stderr[-2000:]
    usage = subprocess.run([python, "-m", "cnnstudy"], capture_output=True, text=True)
    assert usage.returncode == 0 and "train, describe, report, reproduce, ui" in usage.stderr
    wrong = subprocess.run([python, "-m", "cnnstudy", "nope"], capture_output=True, text=True)
    assert wrong.returncode == 2 and "got nope" in wrong.stderr


def test_a_one_cycle_schedule_whose_warm_up_is_one_step_long_runs():
    """OneCycleLR divides by its warm-up's length: 0 steps at pct_start 0.2 of 5 steps."""
    import torch

    from cnnstudy.run.train import optimizer_factories

    optimizer, scheduler = optimizer_factories(compose(["scheduler=onecycle"]))
    for steps in (4, 5, 10, 11):
        opt = optimizer([torch.nn.Parameter(torch.zeros(1))])
        schedule = scheduler(opt, steps)
        rates = [opt.param_groups[0]["lr"]]
        for _ in range(steps - 1):  # the run's steps: the first rate, then one per step
            opt.step()
            schedule.step()
            rates.append(opt.param_groups[0]["lr"])
        assert max(rates) > compose([]).optimizer.lr / 2  # warmed up towards max_lr
        assert rates[-1] < max(rates) / 100  # and annealed
