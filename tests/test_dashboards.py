"""The two windows on a study besides its report: optuna-dashboard, served by
`cnnstudy-ui --optuna` on a real study, read through its own HTTP API."""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.request

import pytest

from .conftest import BIN
from .test_study import study

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _get(url: str, deadline: float) -> dict:
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as answer:
                return json.loads(answer.read())
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


def test_optuna_dashboard_shows_a_study_with_its_objective_named_and_its_epochs(tmp_path):
    done = study(tmp_path, "sweep=hidden_units", "hydra.sweeper.n_trials=2")
    assert done.returncode == 0, done.stderr[-3000:]
    port = _free_port()
    server = subprocess.Popen(
        [
            str(BIN / "cnnstudy-ui"),
            "--optuna",
            "--storage",
            f"sqlite:///{tmp_path}/optuna.db",
            "--port",
            str(port),
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        studies = _get(f"{base}/api/studies", time.monotonic() + 60)["study_summaries"]
        (found,) = [s for s in studies if s["study_name"] == "hidden_units"]
        detail = _get(f"{base}/api/studies/{found['study_id']}", time.monotonic() + 10)
        assert detail["objective_names"] == ["val/acc"]  # not "Objective 0"
        assert detail["has_intermediate_values"]  # every validation epoch, no pruner needed
        trial = detail["trials"][0]
        assert [v["step"] for v in trial["intermediate_values"]] == [0, 1, 2]
        shown = {a["key"] for a in detail["union_user_attrs"]}
        assert not shown & {"cnnstudy.pid", "cnnstudy.host", "cnnstudy.boot_id"}, shown
        assert "mlflow_run_id" in shown
    finally:
        server.terminate()
        out = server.communicate(timeout=30)[0]
    assert f"http://127.0.0.1:{port}/dashboard" in out


def test_the_optuna_dashboard_of_a_storage_that_does_not_exist_is_an_error(tmp_path):
    from .conftest import run_cli

    done = run_cli(
        "cnnstudy-ui", "--optuna", "--storage", f"sqlite:///{tmp_path}/none.db", cwd=tmp_path
    )
    assert done.returncode == 2 and "no such file" in done.stderr
    assert not (tmp_path / "none.db").exists()


def test_the_printed_dashboard_address_is_the_one_cnnstudy_ui_serves(tmp_path):
    """cnnstudy-ui notes where it serves a SQLite store; links use it while it runs."""
    import json
    import os

    from cnnstudy.run import dashboard

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert dashboard.address(uri) == ("http://127.0.0.1:5000", False)  # nothing noted
    noted = tmp_path / "mlflow.db.ui.json"
    noted.write_text(json.dumps({"url": "http://127.0.0.1:5077", "pid": os.getpid()}))
    assert dashboard.address(uri) == ("http://127.0.0.1:5077", True)
    assert dashboard.run_link(uri, "3", "abc") == "http://127.0.0.1:5077/#/experiments/3/runs/abc"
    noted.write_text(json.dumps({"url": "http://127.0.0.1:5077", "pid": 2**22 + 12345}))
    assert dashboard.address(uri)[1] is False  # that server is gone: the default again
