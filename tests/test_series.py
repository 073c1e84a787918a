"""Series from the UCR/UEA archives (the sets aeon ships in its wheel, and the user's own
.ts files), regressions, and the 1D and 3D questions as tiny studies with their reports."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import optuna
import pytest

from cnnstudy.config.check import check, resolve
from cnnstudy.config.compose import compose
from cnnstudy.errors import ConfigError

from .conftest import SHARED, SMOKE, need_real_mnist, run_cli, train_cli
from .test_study import runs_of, study


def _ucr(*overrides: str):
    return resolve(compose(["data=ucr", *overrides]))


def _error(*overrides: str) -> str:
    with pytest.raises(ConfigError) as caught:
        check(compose(list(overrides)))
    return str(caught.value)


@pytest.mark.parametrize(
    "problem, extra",
    [
        ("GunPoint", []),
        ("BasicMotions", []),  # six channels, classes named
        ("JapaneseVowels", ["data.unequal=pad"]),  # 7 to 29 steps, twelve channels
        ("Covid3Month", []),  # regression
    ],
)
def test_the_sets_aeon_ships_read_as_aeons_own_loaders_read_them(problem, extra):
    from aeon.datasets import load_classification, load_regression

    from cnnstudy.data.sources import ucr

    cfg = _ucr(f"data.problem={problem}", *extra)
    check(cfg)
    decoded = ucr(cfg.data)
    regression = problem == "Covid3Month"
    assert cfg.data.task == ("regression" if regression else "classification")
    for split, x, y in (
        ("train", decoded.images, decoded.labels),
        ("test", decoded.test_images, decoded.test_labels),
    ):
        if regression:
            series, targets = load_regression(problem, split=split)
            np.testing.assert_array_equal(y.numpy(), targets.astype(np.float32))
        else:
            series, labels, meta = load_classification(
                problem, split=split, return_metadata=True, load_equal_length=False
            )
            assert [decoded.classes[i].lower() for i in y] == [str(v).lower() for v in labels]
            assert cfg.data.num_classes == len(decoded.classes) == len(meta["class_values"])
        assert tuple(x.shape) == (len(series), cfg.data.channels, cfg.data.length)
        for i, s in enumerate(series):
            steps = s.shape[-1]
            np.testing.assert_array_equal(x[i, :, :steps].numpy(), s.astype(np.float32))
            assert not x[i, :, steps:].any()  # padded with zeros at the end
    if problem == "JapaneseVowels":
        assert (cfg.data.channels, cfg.data.length) == (12, 29)
    if problem == "BasicMotions":
        assert cfg.data.channels == 6 and len(decoded.classes) == 4


def _ts(path: Path, rows: list[str], header: str = "@classLabel true a b") -> Path:
    path.write_text(
        "# a test set\n@problemName t\n@timeStamps false\n@univariate true\n"
        f"{header}\n@data\n" + "\n".join(rows) + "\n"
    )
    return path


def test_series_sets_and_files_are_checked_with_clear_errors(tmp_path):
    from cnnstudy.study.loop import _check_task
    from cnnstudy.study.settings import Settings
    from cnnstudy.study.settings import check as check_settings

    said = _error("data=ucr", "data.problem=JapaneseVowels")
    assert "data.unequal=error" in said and "run from 7 to 29 steps" in said
    assert "data.unequal=pad" in said
    said = _error("data=ucr", "data.problem=JapaneseVowels", "data.unequal=pad", "data.length=20")
    assert said.startswith("data.length=20") and "never cuts" in said
    said = _error("data=ucr", "data.problem=Nope")
    assert "not a set aeon ships" in said and "GunPoint" in said and "OSULeaf" in said
    assert "data.length=150" in _error("data=ucr", "data.length=100")
    assert _error("data=ucr", "data.channels=3").startswith("data.channels=3: GunPoint has 1")
    assert "classification set" in _error("data=ucr", "data.task=regression")
    assert _error("data=digits", "data.task=regression").startswith("data.task=regression")
    assert "valid: classification, regression" in _error("data=digits", "data.task=ranking")

    train = _ts(tmp_path / "t_TRAIN.ts", ["1.0,2.0,3.0:a", "2.0,1.0,0.0:b"])
    good = ["data=ucr", f"data.path={train}"]
    assert _ucr(*good).data.length == 3 and _ucr(*good).data.num_classes == 2
    holes = _ts(tmp_path / "h.ts", ["1.0,?,3.0:a", "2.0,1.0,0.0:b"])
    assert "missing values" in _error("data=ucr", f"data.path={holes}")
    unlisted = _ts(tmp_path / "u.ts", ["1.0,2.0,3.0:a", "2.0,1.0,0.0:c"])
    assert "does not list (c)" in _error("data=ucr", f"data.path={unlisted}")
    (tmp_path / "n.ts").write_text("1,2,3:a\n")
    assert "no @data line" in _error("data=ucr", f"data.path={tmp_path / 'n.ts'}")
    assert "no such file" in _error(*good, f"data.test_path={tmp_path / 'absent.ts'}")
    said = _error("data=ucr", f"data.test_path={train}")
    assert said.startswith("data.test_path=") and "needs its training file too" in said
    unlabelled = _ts(tmp_path / "l.ts", ["1.0,2.0,3.0", "2.0,1.0,0.0"], "@classLabel false")
    assert "has no labels" in _error("data=ucr", f"data.path={unlabelled}")
    ragged = _ts(tmp_path / "r.ts", ["1.0,2.0,3.0:1.0,2.0:a", "2.0,1.0,0.0:1,2,3:b"])
    assert "series 1 has channels of [2, 3] steps" in _error("data=ucr", f"data.path={ragged}")
    lying = _ts(
        tmp_path / "e.ts", ["1.0,2.0,3.0:a", "2.0,1.0:b"], "@equalLength true\n@classLabel true a b"
    )
    assert "says @equalLength true" in _error("data=ucr", f"data.path={lying}")
    cased = _ts(tmp_path / "c.ts", ["1.0,2.0,3.0:A", "2.0,1.0,0.0:a"], "@classLabel true A a")
    assert "differ only in case (A, a)" in _error("data=ucr", f"data.path={cased}")
    from cnnstudy.data.sources import ucr

    spaced = _ts(tmp_path / "s.ts", ["1.0,2.0,3.0: a", "2.0,1.0,0.0: b"])
    assert ucr(_ucr(f"data.path={spaced}").data).labels.tolist() == [0, 1]
    said = _error("data=ucr", "data.problem=Covid3Month", "trainer.precision=bf16-true")
    assert said.startswith("trainer.precision=bf16-true: a regression's targets")

    with pytest.raises(ConfigError, match="val/rmse is better lower"):
        check_settings(Settings(objective="val/rmse", direction="maximize"))
    with pytest.raises(ConfigError, match="val/r2 is better higher"):
        check_settings(Settings(objective="val/r2", direction="minimize"))
    regression = compose(["data=ucr", "data.problem=Covid3Month"])
    with pytest.raises(ConfigError, match="logs no accuracy"):
        _check_task(regression, ["val/acc"])
    with pytest.raises(ConfigError, match="only a regression logs it"):
        _check_task(compose([]), ["val/rmse"])
    _check_task(regression, ["val/rmse"])

    shown = run_cli("cnnstudy-describe", "data=ucr", "data.problem=JapaneseVowels", cwd=tmp_path)
    assert shown.returncode == 2 and "Traceback" not in shown.stderr
    assert shown.stderr.strip().startswith("cnnstudy: error: data.unequal=error")


@pytest.mark.slow
def test_a_regression_study_minimizes_val_rmse_and_its_runs_log_rmse_mae_r2(tmp_path):
    done = study(
        tmp_path,
        "data=ucr",
        "data.problem=Covid3Month",
        "model.hidden_units=choice(8,32)",
        "optimizer.lr=tag(log,interval(0.001,0.01))",
        "hydra.sweeper.objective=val/rmse",
        "hydra.sweeper.direction=minimize",
        "hydra.sweeper.n_trials=3",
        "hydra.sweeper.study_name=covid",
        "trainer.max_epochs=2",
        "logger.log_images=true",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    made = optuna.load_study(study_name="covid", storage=f"sqlite:///{tmp_path}/optuna.db")
    assert made.direction == optuna.study.StudyDirection.MINIMIZE
    values = [t.value for t in made.trials if t.value is not None]
    assert len(values) == 3 and made.best_value == min(values)
    trials = [r for r in runs_of(tmp_path) if r.data.tags.get("cnnstudy.run_kind") == "trial"]
    assert len(trials) == 3
    for run in trials:
        metrics = run.data.metrics
        assert {"val/rmse", "val/mae", "val/r2", "test/rmse", "test/mae", "test/r2"} <= set(metrics)
        assert "val/acc" not in metrics and metrics["val/rmse"] >= 0
        assert np.isclose(
            metrics["val/rmse"], made.trials[int(run.data.tags["cnnstudy.trial"])].value
        )
        assert metrics["test/mae"] <= metrics["test/rmse"]  # so it is for any errors
    client = __import__("mlflow").MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    drawn = [a.path for a in client.list_artifacts(trials[0].info.run_id, "pictures")]
    assert "pictures/predicted_vs_true.png" in drawn and "pictures/filters_conv1.png" in drawn
    assert "best: trial" in done.stdout and "val/rmse" in done.stdout


def _question(tmp_path: Path, sweep: str, *args: str) -> Path:
    done = study(
        tmp_path,
        f"sweep={sweep}",
        *args,
        "hydra.sweeper.seeds=1",
        "hydra.sweeper.report=true",
        "logger.log_images=true",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (report,) = (tmp_path / "multirun").rglob("report/index.html")
    return report


@pytest.mark.slow
def test_the_1d_question_runs_as_a_tiny_study_with_its_report(tmp_path):
    report = _question(
        tmp_path, "series_field", "data.problem=GunPoint", "hydra.sweeper.n_trials=2"
    )
    page = report.read_text()
    assert "how wide must a filter be to see the shape in a series?" in page
    assert "model.receptive_field" in page and (report.parent / "isolation.png").is_file()
    runs = [r for r in runs_of(tmp_path) if r.data.tags.get("cnnstudy.run_kind") == "trial"]
    assert {r.data.params["data.problem"] for r in runs} == {"GunPoint"}
    assert {r.data.params["data.length"] for r in runs} == {"150"}
    client = __import__("mlflow").MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    drawn = [a.path for a in client.list_artifacts(runs[0].info.run_id, "pictures")]
    assert {"pictures/filters_conv1.png", "pictures/misclassified.png"} <= set(drawn)


@pytest.mark.slow
def test_the_3d_question_runs_as_a_tiny_study_with_its_report(tmp_path):
    need_real_mnist()
    report = _question(
        tmp_path,
        "clip_time",
        f"data.root={SHARED}",
        "data.clips=60",
        "hydra.sweeper.n_trials=2",
    )
    page = report.read_text()
    assert "does a clip need a time axis in its filters" in page
    runs = [r for r in runs_of(tmp_path) if r.data.tags.get("cnnstudy.run_kind") == "trial"]
    fields = {r.data.params["model.receptive_field"] for r in runs}
    assert fields == {"[1, 5, 5]", "[3, 5, 5]"}, fields
    assert {r.data.params["network.stage_outputs"] for r in runs} == {'["4x20x20x8", "2x10x10x8"]'}
    client = __import__("mlflow").MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    drawn = [a.path for a in client.list_artifacts(runs[0].info.run_id, "pictures")]
    assert {"pictures/filters_conv1.png", "pictures/misclassified.png"} <= set(drawn)
    assert not any("feature_maps" in path for path in drawn)  # 2D only


def test_medmnist_offline_is_a_clean_error_naming_the_file_and_where_it_goes(tmp_path):
    """MedMNIST's files are not on this machine: with data.download=true medmnist's own
    download code runs and fails (no internet); without it, the check says so first."""
    said = _error("data=medmnist", f"data.root={tmp_path}", "data.problem=x")
    assert "valid (MedMNIST's 3D sets): organmnist3d" in said
    layers = check(compose(["data=medmnist", f"data.root={tmp_path}"]))  # as describe does
    assert layers[-1].out_shape == (11,)  # organmnist3d's 11 organs, from medmnist's table
    from cnnstudy.data.files import check_files

    cfg = _cfg_medmnist(tmp_path / "none")
    with pytest.raises(ConfigError, match="the file is missing") as caught:
        check_files(cfg.data)
    assert str(tmp_path / "none" / "organmnist3d.npz") in str(caught.value)
    assert not (tmp_path / "none").exists()  # nothing written without a download
    tried = run_cli(
        "cnnstudy-train",
        "data=medmnist",
        f"data.root={tmp_path}",
        "data.download=true",
        cwd=tmp_path,
        env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/m.db"},
        timeout=120,
    )
    assert tried.returncode == 2 and "Traceback" not in tried.stderr, tried.stderr[-2000:]
    line = tried.stderr.strip().splitlines()[-1]
    assert line.startswith("cnnstudy: error: data=medmnist: download failed")
    assert str(tmp_path / "organmnist3d.npz") in line and "zenodo.org" in line
    assert "put it there" in line


def _cfg_medmnist(root: Path):
    return resolve(compose(["data=medmnist", f"data.root={root}"]))


@pytest.mark.slow
def test_a_medmnist_file_in_its_layout_is_read_with_its_classes_and_trains(tmp_path):
    """A file in medmnist's own layout (train/val/test _images and _labels), made here:
    the real ones cannot be downloaded on this machine. Read, then a 3D run trains on it
    in this process (what cnnstudy-train calls)."""
    from cnnstudy.data.splits import load_splits

    rng = np.random.default_rng(0)
    parts = {}
    for split, n in (("train", 30), ("val", 6), ("test", 12)):
        parts[f"{split}_images"] = rng.integers(0, 256, (n, 28, 28, 28), dtype=np.uint8)
        parts[f"{split}_labels"] = (np.arange(n) % 11).reshape(n, 1)
    np.savez(tmp_path / "organmnist3d.npz", **parts)
    cfg = _cfg_medmnist(tmp_path)
    assert cfg.data.num_classes == 11
    layers = check(cfg)
    assert layers[0].in_shape == (1, 28, 28, 28)
    splits = load_splits(cfg.data)
    assert len(splits.train) + len(splits.val) == 36 and len(splits.test) == 12
    assert splits.train.images.shape[1:] == (1, 28, 28, 28)
    assert splits.classes[0] == "liver" and len(splits.classes) == 11
    assert splits.test.images.numpy()[:, 0].tolist() == parts["test_images"].tolist()
    _, (run,) = train_cli(
        tmp_path, *SMOKE, "data=medmnist", f"data.root={tmp_path}", "model.receptive_field=3"
    )
    assert run.info.status == "FINISHED" and "test/acc" in run.data.metrics
    assert run.data.params["data.problem"] == "organmnist3d"
    assert run.data.params["network.stage_outputs"] == '["13x13x13x10"]'
