"""The wheel: built from the checkout, installed into a scratch environment, used from a
folder outside the checkout, as a SLURM or cloud worker would."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import mlflow
import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    where = tmp_path_factory.mktemp("wheel")
    # built from a copy of what the wheel is made of: setuptools writes build/ beside it
    source = where / "source"
    skip = shutil.ignore_patterns("*.egg-info", "__pycache__")
    for folder in ("src", "conf", "sweeps"):
        shutil.copytree(REPO / folder, source / folder, ignore=skip)
    for file in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / file, source / file)
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation"]
        + ["-w", str(where / "dist"), "-q"],
        capture_output=True,
        text=True,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (where / "dist").glob("cnnstudy-*.whl")
    env_dir = where / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True)
    # the scratch environment reuses this one's dependencies (torch, Lightning, MLflow...),
    # not its editable cnnstudy: a plain path line, whose .pth files are not run
    site = Path(
        subprocess.run(
            [
                str(env_dir / "bin" / "python"),
                "-c",
                "import site; print(site.getsitepackages()[0])",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(env_dir / "bin" / "python"), "install"]
        + ["--no-deps", "-q", str(wheel)],
        capture_output=True,
        text=True,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    outside = where / "elsewhere"
    outside.mkdir()
    return {"wheel": wheel, "bin": env_dir / "bin", "outside": outside}


def _run(installed: dict, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "PYTHONPATH")}
    full.update(env or {})
    return subprocess.run(
        [str(installed["bin"] / args[0]), *args[1:]],
        cwd=installed["outside"],
        env=full,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_wheel_ships_every_config_file(installed):
    shipped = {
        name.removeprefix("cnnstudy/conf/")
        for name in zipfile.ZipFile(installed["wheel"]).namelist()
        if name.startswith("cnnstudy/conf/") and name.endswith(".yaml")
    }
    in_repo = {str(p.relative_to(REPO / "conf")) for p in (REPO / "conf").rglob("*.yaml")}
    assert shipped == in_repo
    names = zipfile.ZipFile(installed["wheel"]).namelist()
    assert "cnnstudy/network/csrc/cpu_kernels.c" in names
    sweeps = {n.removeprefix("cnnstudy/sweeps/") for n in names if n.startswith("cnnstudy/sweeps/")}
    assert sweeps == {p.name for p in (REPO / "sweeps").glob("*.yaml")}
    assert "hydra_plugins/cnnstudy_sweeper/sweeper.py" in names


def test_the_installed_package_runs_from_outside_the_checkout(installed):
    where = _run(installed, "python", "-c", "import cnnstudy; print(cnnstudy.__file__)")
    assert where.stdout.startswith(str(installed["bin"].parent)), where.stdout + where.stderr

    study = _run(
        installed,
        "cnnstudy-train",
        "-m",
        "sweep=hidden_units",
        "hydra.sweeper.n_trials=1",
        "trainer=smoke",
        env={"MLFLOW_TRACKING_URI": f"sqlite:///{installed['outside']}/study.db"},
    )
    assert study.returncode == 0, study.stderr[-3000:]  # the shipped sweep, the plugin found
    assert "best: trial 0" in study.stdout

    described = _run(installed, "cnnstudy-describe", "model=lenet5")
    assert described.returncode == 0, described.stderr
    assert "61,706" in described.stdout

    uri = f"sqlite:///{installed['outside']}/mlflow.db"
    trained = _run(
        installed,
        "cnnstudy-train",
        "trainer=smoke",
        "logger.log_model=false",
        env={"MLFLOW_TRACKING_URI": uri},
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("cnnstudy").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["network.params"] == "394470"
    assert run.data.tags["mlflow.source.git.commit"] == "unknown"  # not a checkout


def test_describe_takes_a_config_dir_of_your_own(installed, tmp_path):
    conf = tmp_path / "my_conf" / "model"
    conf.mkdir(parents=True)
    (conf / "my_net.yaml").write_text("name: my_net\nfilters: 16\nhidden_units: 64\n")
    for command in (["cnnstudy-describe"], ["cnnstudy-train", "--cfg", "job"]):
        done = _run(installed, *command, "--config-dir", str(tmp_path / "my_conf"), "model=my_net")
        assert done.returncode == 0, done.stderr
        assert "my_net" in done.stdout
    described = _run(
        installed,
        "cnnstudy-describe",
        "--json",
        "--config-dir",
        str(tmp_path / "my_conf"),
        "model=my_net",
    )
    assert '"params": ' + str(16 * 26 + (14 * 14 * 16 + 1) * 64 + 65 * 10) in described.stdout


def test_no_private_optuna_api_is_used():
    """Public APIs only, so that an Optuna upgrade is a version bump (issue 15, item 7)."""
    import re

    src = Path(__file__).resolve().parents[1] / "src"
    private = re.compile(
        r"\._storage\b|\._trial_id\b|\._study_id\b|optuna\.\w+\._\w+|from optuna\.\w+\._"
    )
    found = [
        f"{path.relative_to(src)}:{n}: {line.strip()}"
        for path in src.rglob("*.py")
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if private.search(line)
    ]
    assert not found, found
