"""Redaction and naming: what reaches MLflow."""

from __future__ import annotations

import pytest

from cnnstudy.redact import override_secret, redact, redact_text
from cnnstudy.run.tracking import flatten


def test_password_in_a_url_is_redacted():
    assert redact_text("postgresql://alice:hunter2@db:5432/x") == "postgresql://alice:***@db:5432/x"
    assert redact_text("http://tok@host/path") == "http://tok@host/path"  # no password part
    assert redact_text("sqlite:///tmp/mlflow.db") == "sqlite:///tmp/mlflow.db"
    assert "s3cr3t" not in redact_text("https://host/api?api_key=s3cr3t&x=1")


def test_secret_keys_are_redacted_at_any_depth():
    tree = {
        "logger": {"tags": {"api_token": "abc", "team": "vision"}},
        "db": {"password": "pw"},
        "list": ["mysql://u:pw@h/db"],
    }
    clean = redact(tree)
    assert clean["logger"]["tags"] == {"api_token": "***", "team": "vision"}
    assert clean["db"]["password"] == "***"
    assert clean["list"] == ["mysql://u:***@h/db"]


def test_overrides_are_redacted_by_key_and_url():
    assert override_secret("+logger.tags.token=abc") == "+logger.tags.token=***"
    assert override_secret("logger.tracking_uri=postgresql://a:b@h/d") == (
        "logger.tracking_uri=postgresql://a:***@h/d"
    )
    assert override_secret("model.filters=8") == "model.filters=8"


def test_flatten_uses_dotted_keys():
    assert flatten({"model": {"filters": 8, "list": [1, 2]}, "e": {}}) == {
        "model.filters": "8",
        "model.list": "[1, 2]",
        "e": "{}",
    }


def test_hydra_escaped_overrides_are_redacted_too():
    escaped = "logger.tracking_uri=postgresql\\://u\\:s3cr3tpw@127.0.0.1\\:1/db"
    assert "s3cr3tpw" not in redact_text(escaped)
    assert redact_text("logger.tag={'api_token': 'abc123secret'}") == (
        "logger.tag={'api_token': '***'}"
    )


@pytest.mark.parametrize("sweeper", ["cnnstudy", "basic"])
def test_no_secret_reaches_the_terminal_in_a_multirun(tmp_path, sweeper):
    """The study's early error; with Hydra's basic sweeper, its launch lines, each job's
    error and cnnstudy's summary of failed jobs."""
    from .conftest import run_cli

    result = run_cli(
        "cnnstudy-train",
        "-m",
        f"hydra/sweeper={sweeper}",
        "trainer=smoke",
        "+logger.tags.api_token=abc123secret",
        "logger.tracking_uri=postgresql://u:s3cr3tpw@127.0.0.1:1/db",
        "model.receptive_field=3,5",
        *(
            [f"hydra.sweeper.storage=sqlite:///{tmp_path}/optuna.db"]
            if sweeper == "cnnstudy"
            else []
        ),
        cwd=tmp_path,
    )
    assert result.returncode == 2
    seen = result.stdout + result.stderr
    if sweeper == "basic":
        assert "#1 : " in seen and "2 job(s) of the sweep failed" in seen
    else:
        assert "Traceback" not in seen and "psycopg2" in seen
    assert "s3cr3tpw" not in seen and "abc123secret" not in seen
    assert "postgresql://u:***@127.0.0.1:1/db" in seen


def test_hydras_own_errors_reach_the_terminal_redacted(tmp_path):
    from .conftest import run_cli

    result = run_cli(
        "cnnstudy-train", "logger.log_model=postgresql://u:s3cr3tpw@h/db", cwd=tmp_path
    )
    assert result.returncode == 1  # Hydra's type error, Hydra's exit code
    assert "is not a valid bool" in result.stderr
    assert "s3cr3tpw" not in result.stdout + result.stderr


def test_a_new_sqlite_store_appears_whole_or_not_at_all(tmp_path, monkeypatch):
    """MLflow's tables are made in a scratch file and renamed into place: a command
    stopped while they are made (here: just before the rename) leaves no store, and
    the next command makes one that opens."""
    import os

    import mlflow

    from cnnstudy.run import store

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    real_replace = os.replace

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(store.os, "replace", stopped)
    with pytest.raises(KeyboardInterrupt):
        store.open_experiment(uri, "cnnstudy", str(tmp_path / "a"))
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == []
    monkeypatch.setattr(store.os, "replace", real_replace)
    experiment = store.open_experiment(uri, "cnnstudy", str(tmp_path / "a"))
    assert mlflow.MlflowClient(uri).get_experiment(experiment).name == "cnnstudy"
    assert [p.name for p in tmp_path.iterdir() if ".creating" in p.name] == []
