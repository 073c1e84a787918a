"""Shared helpers: run the real entry points in a fresh process, each in its own MLflow store."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def need_real_mnist() -> Path:
    """../shared/data, where real MNIST lies; without it the test skips, or fails where
    CNNSTUDY_REQUIRE_MNIST=1 (CI)."""
    if not (SHARED / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file():
        if os.environ.get("CNNSTUDY_REQUIRE_MNIST") == "1":
            pytest.fail(f"CNNSTUDY_REQUIRE_MNIST=1 but real MNIST is not in {SHARED}")
        pytest.skip("real MNIST not found in ../shared/data")
    return SHARED


def run_cli(
    name: str, *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    full_env.update(env or {})
    return subprocess.run(
        [str(BIN / name), *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="session", autouse=True)
def _own_data_cache(tmp_path_factory) -> None:
    """Decoded-data caches of the test session stay in its temporary folder."""
    os.environ["CNNSTUDY_CACHE"] = str(tmp_path_factory.mktemp("cnnstudy-cache"))


@pytest.fixture
def store(tmp_path: Path) -> dict[str, str]:
    """Overrides and environment that put a run's database and artifacts under tmp_path."""
    return {
        "uri": f"sqlite:///{tmp_path}/mlflow.db",
        "artifacts": str(tmp_path / "mlartifacts"),
    }


def train_in_process(where: Path, *overrides: str):
    """A smoke run through `cnnstudy.run.train.train` (what cnnstudy-train and a study's
    trials call) in this process, its store under `where`; the finished MLflow run."""
    import mlflow

    from cnnstudy.config.compose import compose
    from cnnstudy.run.train import train

    saved = os.environ.pop("MLFLOW_TRACKING_URI", None)
    try:
        result = train(
            compose(
                [
                    *overrides,
                    "trainer=smoke",
                    "trainer.num_threads=1",
                    "logger.log_model=false",
                    "logger.log_images=false",
                    f"logger.tracking_uri=sqlite:///{where}/m.db",
                    f"logger.artifact_location={where}/a",
                ]
            )
        )
    finally:
        if saved is not None:
            os.environ["MLFLOW_TRACKING_URI"] = saved
    return mlflow.MlflowClient(result.tracking_uri).get_run(result.run_id)


def train_cli(where: Path, *overrides: str) -> tuple[subprocess.CompletedProcess, list]:
    """cnnstudy-train in its own MLflow store under `where`; the process and its runs."""
    import mlflow

    uri = f"sqlite:///{where}/mlflow.db"
    if not any(o.startswith("logger.log_images=") for o in overrides):
        overrides = (*overrides, "logger.log_images=false")  # tested in test_report.py
    result = run_cli(
        "cnnstudy-train",
        *overrides,
        f"logger.artifact_location={where}/mlartifacts",
        cwd=where,
        env={"MLFLOW_TRACKING_URI": uri},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    mlflow.set_tracking_uri(uri)  # runs:/ URIs resolve against the global store
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("cnnstudy")
    return result, client.search_runs([experiment.experiment_id])
