"""One run trained by 2 processes (DDP, gloo on CPU): one MLflow run, the metric over
every process's share of the data, pruning and signals reaching every process."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import mlflow
import optuna
import pytest

from .conftest import BIN, run_cli, start_cli

pytestmark = pytest.mark.slow

DDP = ("trainer=smoke", "trainer.devices=2", "trainer.accelerator=cpu", "trainer.num_threads=1")


def _marked(mark: str) -> list[int]:
    """Processes started with `mark` in their environment: those the command started, and
    the command itself unless tests/forkserver.py forked it."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if mark.encode() in (proc / "environ").read_bytes():
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def _env(where: Path, mark: str) -> dict[str, str]:
    return {"MLFLOW_TRACKING_URI": f"sqlite:///{where}/mlflow.db", "CNNSTUDY_TEST_MARK": mark}


def _gone(mark: str, within: float = 15.0) -> bool:
    deadline = time.monotonic() + within
    while _marked(mark) and time.monotonic() < deadline:
        time.sleep(0.3)
    return not _marked(mark)


EVALUATE = """
import sys, torch
from cnnstudy.config.check import check
from cnnstudy.config.compose import compose
from cnnstudy.data.batches import ImageDataModule
from cnnstudy.network.modules import build_network

cfg = compose(sys.argv[2:])
network = build_network(check(cfg), cpu_kernels=False)
network.load_state_dict(torch.load(sys.argv[1], weights_only=True))
data = ImageDataModule(cfg.data, seed=cfg.seed)
val = data.prepare().val
mean = torch.tensor(data.mean).view(1, -1, 1, 1)
std = torch.tensor(data.std).view(1, -1, 1, 1)
with torch.no_grad():
    logits = network.eval()((val.images - mean) / std)
print(float((logits.argmax(1) == val.labels).double().mean()))
"""


def _val_accuracy(overrides: list[str], state_dict_path: Path) -> float:
    """The validation accuracy of trained weights over the whole validation split, computed
    in one process of its own (this one keeps no data)."""
    done = subprocess.run(
        [str(BIN / "python"), "-c", EVALUATE, str(state_dict_path), *overrides],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return float(done.stdout.strip().splitlines()[-1])


def test_a_ddp_run_logs_one_run_whose_metric_covers_every_process_share(tmp_path):
    overrides = [*DDP, "trainer.max_epochs=2", "trainer.limit_val_batches=null"]
    mark = uuid.uuid4().hex
    done = run_cli(
        "cnnstudy-train",
        *overrides,
        "logger.log_images=false",
        f"logger.artifact_location={tmp_path}/a",
        cwd=tmp_path,
        env=_env(tmp_path, mark),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("cnnstudy").experiment_id])
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "val/acc")
    assert [m.step for m in history] == sorted({m.step for m in history})  # once per epoch
    weights = client.download_artifacts(run.info.run_id, "weights/state_dict.pt", str(tmp_path))
    # the logged accuracy is the whole split's, not process 0's half
    assert run.data.metrics["val/acc"] == pytest.approx(
        _val_accuracy(overrides, Path(weights)),
        abs=1e-6,  # logged as float32
    )
    assert "It is recommended" not in done.stderr  # the sum across processes is cnnstudy's
    assert _gone(mark)


def test_a_pruned_ddp_trial_stops_every_process_and_the_study_ends(tmp_path):
    mark = uuid.uuid4().hex
    done = run_cli(
        "cnnstudy-train",
        "-m",
        "model.hidden_units=int(interval(16, 64))",
        *DDP,
        "trainer.max_epochs=4",
        "hydra.sweeper.n_trials=1",
        "hydra.sweeper.study_name=ddp",
        "hydra.sweeper.pruner={_target_: optuna.pruners.ThresholdPruner, lower: 0.99}",
        "hydra.sweeper.report=false",
        "logger.log_images=false",
        "logger.log_model=false",
        f"hydra.sweeper.storage=sqlite:///{tmp_path}/optuna.db",
        f"logger.artifact_location={tmp_path}/a",
        cwd=tmp_path,
        env=_env(tmp_path, mark),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    study = optuna.load_study(
        study_name="ddp",
        storage=f"sqlite:///{tmp_path}/optuna.db",
    )
    trials = study.get_trials(deepcopy=False)
    assert [t.state for t in trials] == [optuna.trial.TrialState.PRUNED]
    assert all(list(t.intermediate_values) == [0] for t in trials)  # reported once, by rank 0
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("cnnstudy").experiment_id])
    trial_runs = [r for r in runs if r.data.tags.get("cnnstudy.run_kind") == "trial"]
    assert len(trial_runs) == 1  # one run for the trial, not one per process
    for run in trial_runs:
        assert run.info.status == "KILLED" and run.data.tags["cnnstudy.trial_state"] == "PRUNED"
        assert run.data.tags["cnnstudy.epochs_trained"] == "1"
    assert _gone(mark)


def test_sigterm_stops_every_process_of_a_ddp_run(tmp_path):
    mark = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(_env(tmp_path, mark))
    command = start_cli(
        [str(BIN / "cnnstudy-train"), *DDP, "trainer.max_epochs=400", "logger.log_images=false"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    from cnnstudy.run.store import serialized

    uri = f"sqlite:///{tmp_path}/mlflow.db"

    def training() -> bool:  # a client opens (or makes) the store: under its lock only
        client = mlflow.MlflowClient(uri)
        experiment = client.get_experiment_by_name("cnnstudy")
        runs = experiment and client.search_runs([experiment.experiment_id])
        return bool(runs and client.get_metric_history(runs[0].info.run_id, "train/loss"))

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # until both processes train
        time.sleep(0.5)
        # the two DDP processes (/proc shows a command forked by tests/forkserver.py with
        # the server's environment, so the command itself may not be among them); the
        # store read under its lock: it may be being made
        if len(_marked(mark)) >= 2 and (tmp_path / "mlflow.db").exists():
            if serialized(uri, training):
                break
    command.send_signal(signal.SIGTERM)
    out, _ = command.communicate(timeout=60)
    assert command.returncode == 143, out[-3000:]
    assert "stopped by SIGTERM" in out
    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("cnnstudy").experiment_id])
    assert run.info.status == "KILLED"
    assert _gone(mark), "a DDP process outlived the run"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_run_on_two_machines_as_srun_starts_it_records_one_run(tmp_path):
    """trainer.num_nodes=2 as srun starts it: two tasks, one per machine and device (here
    two processes on this machine with the variables srun gives each task; gloo on CPU).
    Rank 0 records the one run, its metric over both tasks' shares; rank 1 only trains."""
    overrides = [
        "trainer=smoke",
        "trainer.num_nodes=2",
        "trainer.devices=1",
        "trainer.accelerator=cpu",
        "trainer.num_threads=1",
        "trainer.max_epochs=2",
        "trainer.limit_val_batches=null",
    ]
    port = _free_port()
    mark = uuid.uuid4().hex
    tasks = []
    for rank in (0, 1):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MLFLOW_"))}
        env.update(_env(tmp_path, mark))
        env.update(
            {  # what srun sets in each task of `srun --nodes=2 --ntasks-per-node=1`
                "SLURM_JOB_ID": "4242",
                "SLURM_JOB_NAME": "cnnstudy-test",
                "SLURM_NTASKS": "2",
                "SLURM_NTASKS_PER_NODE": "1",
                "SLURM_NNODES": "2",
                "SLURM_NODELIST": "127.0.0.1",
                "SLURM_PROCID": str(rank),
                "SLURM_NODEID": str(rank),
                "SLURM_LOCALID": "0",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
            }
        )
        tasks.append(
            start_cli(
                [
                    str(BIN / "cnnstudy-train"),
                    *overrides,
                    "logger.log_images=false",
                    f"logger.artifact_location={tmp_path}/a",
                ],
                cwd=tmp_path,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outputs = [task.communicate(timeout=300) for task in tasks]
    for task, (_, err) in zip(tasks, outputs, strict=True):
        assert task.returncode == 0, err[-3000:]
        assert "Traceback" not in err
    assert "test/acc" in outputs[0][0] + outputs[0][1]  # rank 0 says the run
    assert "run " not in outputs[1][0]  # rank 1 records nothing
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("cnnstudy").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["trainer.num_nodes"] == "2"
    assert "test/acc" in run.data.metrics
    weights = client.download_artifacts(run.info.run_id, "weights/state_dict.pt", str(tmp_path))
    assert run.data.metrics["val/acc"] == pytest.approx(
        _val_accuracy(overrides, Path(weights)), abs=1e-6
    )  # both tasks' halves of the validation split
    assert _gone(mark)
