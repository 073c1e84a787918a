"""Many writers on one SQLite store, signals, and processes killed without a word."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import mlflow
import pytest

from .conftest import BIN, SMOKE, start_cli

pytestmark = pytest.mark.slow


def _start(where: Path, uri: str, *overrides: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(MLFLOW_TRACKING_URI=uri, OMP_NUM_THREADS="1")
    return start_cli(
        [str(BIN / "cnnstudy-train"), *SMOKE, f"logger.artifact_location={where}/a", *overrides],
        cwd=where,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _runs(uri: str, experiment: str = "cnnstudy") -> list:
    """The experiment's runs, read under the store's lock: a reader opening a fresh store
    while a run creates its tables would otherwise create them too."""
    from cnnstudy.run.store import serialized

    def read() -> list:
        client = mlflow.MlflowClient(uri)
        found = client.get_experiment_by_name(experiment)
        return client.search_runs([found.experiment_id]) if found else []

    return serialized(uri, read)


def test_four_runs_started_at_once_on_a_fresh_store_all_finish(tmp_path):
    """A fresh database (MLflow creates its tables), a new experiment (created once), the
    same datasets logged by all (MLflow looks, then inserts): four processes at once. (Run
    once: a second attempt, for the races' sake, cost 17 s of the suite's time limit.)"""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    procs = [_start(tmp_path, uri, f"seed={i}") for i in range(4)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for proc, out in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, out[-3000:]
    runs = _runs(uri)
    assert len(runs) == 4
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert sorted(r.data.tags["cnnstudy.seed"] for r in runs) == ["0", "1", "2", "3"]


def _wait_for_run(uri: str, proc: subprocess.Popen, timeout: float = 120) -> str:
    """The id of the run `proc` started, once it is RUNNING and training."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        if Path(uri.removeprefix("sqlite:///")).exists():
            running = [r for r in _runs(uri) if r.info.status == "RUNNING"]
            if running and "cnnstudy.pid" in running[0].data.tags:
                time.sleep(1.0)  # inside the fit
                return running[0].info.run_id
        time.sleep(0.2)
    raise AssertionError("no RUNNING run appeared")


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_during_training_marks_the_run_killed_and_exits_128_plus_it(
    tmp_path, signum, code
):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    proc = _start(tmp_path, uri, "trainer.limit_train_batches=null", "trainer.max_epochs=200")
    run_id = _wait_for_run(uri, proc)
    proc.send_signal(signum)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == code, out[-3000:]
    assert "Traceback" not in out
    run = mlflow.MlflowClient(uri).get_run(run_id)
    assert run.info.status == "KILLED"
    assert signal.Signals(signum).name in run.data.tags["cnnstudy.killed_reason"]


def test_a_run_killed_with_sigkill_is_marked_killed_by_the_next_command(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    proc = _start(tmp_path, uri, "trainer.limit_train_batches=null", "trainer.max_epochs=200")
    run_id = _wait_for_run(uri, proc)
    tags = mlflow.MlflowClient(uri).get_run(run_id).data.tags
    assert tags["cnnstudy.pid"] == str(proc.pid) and tags["cnnstudy.host"]
    proc.kill()
    proc.communicate(timeout=60)
    assert mlflow.MlflowClient(uri).get_run(run_id).info.status == "RUNNING"  # nobody wrote

    nxt = _start(tmp_path, uri)
    out = nxt.communicate(timeout=300)[0]
    assert nxt.returncode == 0, out[-3000:]
    run = mlflow.MlflowClient(uri).get_run(run_id)
    assert run.info.status == "KILLED"
    reason = run.data.tags["cnnstudy.killed_reason"]
    assert f"process {proc.pid}" in reason and "cnnstudy-train" in reason
    others = [r for r in _runs(uri) if r.info.run_id != run_id]
    assert [r.info.status for r in others] == ["FINISHED"]  # the live run was left alone
