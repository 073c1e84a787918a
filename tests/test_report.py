"""Reports: the analysis on Optuna trials made here (no training), then real studies and
their reports, the per-run pictures, the question library, and the HTML in headless
Chromium (CNNSTUDY_REQUIRE_BROWSER=1, set by .ci/run: in CI the browser must be there)."""

from __future__ import annotations

import os
import re
import shutil
import struct
from pathlib import Path

import mlflow
import optuna
import pytest
import yaml
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import create_trial

from cnnstudy.study import analysis, report
from cnnstudy.study import space as spaces

from .conftest import run_cli, train_cli
from .test_study import runs_of, study

REPO = Path(__file__).resolve().parents[1]
UNITS = IntDistribution(8, 1024, log=True)
LR = FloatDistribution(1e-3, 3e-2, log=True)


def _study(trials: list[tuple[dict, float, dict]], *, seeds: int = 1, **attrs) -> optuna.Study:
    """An in-memory study holding these finished trials (params, value, user attrs)."""
    made = optuna.create_study(direction="maximize")
    for key, value in {
        "cnnstudy.objective": ["val/acc"],
        "cnnstudy.scientific": ["model.hidden_units"],
        "cnnstudy.nuisance": ["optimizer.lr"],
        "cnnstudy.seeds": seeds,
        **attrs,
    }.items():
        made.set_user_attr(key, value)
    for params, value, user_attrs in trials:
        dists = {"model.hidden_units": UNITS, "optimizer.lr": LR}
        if "model.activation" in params:
            dists = {
                "model.activation": CategoricalDistribution(["relu", "tanh", "none"]),
                "optimizer.lr": LR,
            }
        made.add_trial(
            create_trial(
                params=params,
                distributions={k: dists[k] for k in params},
                value=value,
                user_attrs=user_attrs,
            )
        )
    return made


def _curve(best_units: int) -> list[tuple[dict, float, dict]]:
    """12 trials whose accuracy peaks at best_units (a fact of this made-up study)."""
    import math

    out = []
    for i, units in enumerate([8, 12, 20, 32, 50, 80, 128, 200, 300, 500, 700, 1000]):
        value = 0.95 - 0.02 * abs(math.log(units) - math.log(best_units))
        out.append(({"model.hidden_units": units, "optimizer.lr": 0.001 + 0.002 * i}, value, {}))
    return out


def test_the_edge_warning_appears_when_the_best_sits_on_the_edge_and_not_otherwise():
    edge = analysis.analyse(_study(_curve(1000)))
    assert len(edge.edges) == 1 and "model.hidden_units=1000" in edge.edges[0]
    assert "high edge of [8, 1024]" in edge.edges[0]
    inside = analysis.analyse(_study(_curve(128)))
    assert inside.edges == []
    assert inside.best.params["model.hidden_units"] == 128


def test_a_study_too_small_to_test_says_so_and_what_it_needs():
    an = analysis.analyse(_study(_curve(128)[:3]))
    assert an.too_small.startswith("The study is too small to answer: fewer than 2 complete")
    big = analysis.analyse(_study(_curve(128)))  # 12 trials: 2 bins of 6 reach the power
    assert big.too_small is None and [s.label for s in big.settings] == ["8-80", "128-1000"]
    assert big.answer.startswith(
        "No detectable difference between the settings of model.hidden_units with 12 trials"
    )
    # 3 settings x 3 trials: the test cannot find 3 s.d. 80% of the time, measured
    thin = [t for i, t in enumerate(_activation_trials([0.011, 0.012, 0.01])) if i % 7 < 3]
    an = analysis.analyse(_study(thin, **{"cnnstudy.scientific": ["model.activation"]}))
    assert an.too_small.startswith("The study is too small to answer: with 3 trials per setting")
    assert "is found 0% of the time" in an.too_small
    assert f"About {an.needed} trials per setting ({3 * an.needed} in all" in an.too_small


def _activation_trials(none_lrs: list[float]) -> list[tuple[dict, float, dict]]:
    """relu and tanh tuned near lr 0.01-0.02, 7 trials each; 'none' tried at the given
    rates and 4 low ones, and worse by 10 points."""
    trials = []
    for act, top in (("relu", 0.95), ("tanh", 0.948)):
        for k, lr in enumerate((0.012, 0.0021, 0.018, 0.0011, 0.015, 0.0026, 0.0019)):
            trials.append(({"model.activation": act, "optimizer.lr": lr}, top - 0.004 * k, {}))
    for k, lr in enumerate([*none_lrs, 0.0012, 0.0017, 0.0015, 0.0018]):
        trials.append(({"model.activation": "none", "optimizer.lr": lr}, 0.85 - 0.004 * k, {}))
    return trials


ACTIVATION = {"cnnstudy.scientific": ["model.activation"]}


def test_the_answer_says_what_the_test_finds_worse_and_what_it_cannot_tell_apart():
    an = analysis.analyse(_study(_activation_trials([0.011, 0.012, 0.01]), **ACTIVATION))
    assert an.too_small is None and an.p_all < 0.05 and an.untuned == {}
    assert [s.label for s in an.settings] == ["relu", "tanh", "none"]  # the choices' order
    assert an.answer.startswith("model.activation=relu is best: 95.0%. Worse: none by 10.0 points")
    assert "No detectable difference from it: tanh (p=" in an.answer
    none = an.settings[2].difference
    assert none.worse and 0 < none.interval[0] < none.difference < none.interval[1]
    tanh = an.settings[1].difference
    assert not tanh.worse and tanh.interval[0] < 0 < tanh.interval[1]  # both sides of 0
    page = report.render(an, {}, storage="sqlite:///x.db", parent_run="")
    assert "permutation test" in page and "— worse" in page


def test_the_edge_of_the_range_is_not_a_conclusion():
    an = analysis.analyse(_study(_curve(1000)))
    assert "The best is at the edge of the range searched (model.hidden_units=1000)" in an.answer
    assert "not a conclusion there" in an.answer


def test_a_setting_that_lost_without_its_nuisance_tuned_is_flagged_as_confounded():
    """The pooling study on MNIST (docs/findings.md): the losing setting only ever had
    learning rates far from the ones the winners needed. Its loss is not a finding."""
    an = analysis.analyse(_study(_activation_trials([0.0013, 0.0016, 0.0014]), **ACTIVATION))
    assert an.too_small is None
    assert list(an.untuned) == ["none"]
    assert "optimizer.lr=0.0012-0.0018" in an.untuned["none"]
    assert "Not a finding for model.activation=none" in an.answer
    (warning,) = analysis.untuned_warnings(an)
    assert warning.startswith("model.activation=none may be worse only for want of tuning")
    page = report.render(an, {}, storage="sqlite:///x.db", parent_run="")
    assert "Confounded: model.activation=none may be worse" in page
    # the same loss with a learning rate near the winners' tried there: a finding
    fair = analysis.analyse(_study(_activation_trials([0.0013, 0.011, 0.0016]), **ACTIVATION))
    assert fair.untuned == {}
    assert "Worse: none by" in fair.answer and "Not a finding" not in fair.answer


def test_the_verdict_is_calibrated_on_simulated_studies_at_the_question_librarys_budgets():
    """A setting called worse when none is: at most 5% of the time. A setting worse by 3
    seed s.d.: found at least 80% of the time with the trials `budget` asks for."""
    from cnnstudy.study import verdict

    for settings, seeds in ((2, 2), (3, 1), (4, 2)):
        needed = verdict.budget(settings, seeds)
        false, power = verdict.rates(settings, needed, seeds)
        assert false <= verdict.ALPHA and power >= verdict.POWER, (settings, seeds, needed)
        assert verdict.rates(settings, needed - 1, seeds)[1] < verdict.POWER  # the fewest
    assert verdict.rates(4, 3, 2)[1] < 0.05  # the activation study's 12 trials: cannot


def _report_text(page: Path) -> str:
    text = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", page.read_text())
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", text))


def _load(where: Path, name: str) -> optuna.Study:
    from cnnstudy.locks import store_lock

    url = f"sqlite:///{where}/optuna.db"
    with store_lock(url):
        return optuna.load_study(study_name=name, storage=url)


@pytest.mark.slow
def test_a_studys_report_matches_its_storage_and_reaches_mlflow(tmp_path):
    small = study(
        tmp_path, "sweep=hidden_units", "hydra.sweeper.n_trials=3", "hydra.sweeper.report=true"
    )
    assert small.returncode == 0, small.stderr[-3000:]
    (page,) = tmp_path.glob("multirun/*/*/report/index.html")
    assert f"report: {page.relative_to(tmp_path)}" in small.stdout
    assert "too small to answer" in _report_text(page)
    shutil.rmtree(page.parent.parent.parent)

    grown = study(
        tmp_path, "sweep=hidden_units", "hydra.sweeper.n_trials=12", "hydra.sweeper.report=true"
    )
    assert grown.returncode == 0, grown.stderr[-3000:]
    (page,) = tmp_path.glob("multirun/*/*/report/index.html")
    text = _report_text(page)
    stored = _load(tmp_path, "hidden_units")
    best = stored.best_trial
    assert f"Trial {best.number} : val/acc {100 * best.value:.1f}%" in text  # a link to its run
    assert "12 trials: 12 complete, 0 pruned, 0 rejected by the shape check, 0 failed" in text
    assert "too small" not in text
    assert best.user_attrs["reproduce"] in text
    order = list(analysis.importances(stored))
    shown = re.findall(r"<tr><td>([\w.]+)</td><td>[\d.]+</td></tr>", page.read_text())
    assert shown == order and set(order) == {"model.hidden_units", "optimizer.lr"}
    pngs = sorted(p.name for p in page.parent.glob("*.png"))
    for name in ("edf.png", "isolation.png", "history.png", "importances.png", "params.png"):
        assert name in pngs
        assert (page.parent / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # self-contained: nothing fetched; links lead only to the MLflow UI on this machine
    html = page.read_text()
    assert "https://" not in html and not re.search(r"src=['\"]http", html)
    assert set(re.findall(r"href='(http://[^/']+)/", html)) == {"http://127.0.0.1:5000"}

    (parent,) = [r for r in runs_of(tmp_path) if r.data.tags.get("cnnstudy.run_kind") == "study"]
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    logged = {f.path for f in client.list_artifacts(parent.info.run_id, "report")}
    assert "report/index.html" in logged and "report/isolation.png" in logged
    assert parent.data.tags["cnnstudy.answer"] == analysis.analyse(stored).answer
    assert parent.data.tags["cnnstudy.answer"] in parent.data.tags["mlflow.note.content"]

    again = run_cli(
        "cnnstudy-report",
        "hidden_units",
        "--storage",
        f"sqlite:///{tmp_path}/optuna.db",
        "--out",
        str(tmp_path / "mine"),
        "--no-mlflow",
        cwd=tmp_path,
    )
    assert again.returncode == 0, again.stderr
    assert _report_text(tmp_path / "mine" / "index.html") == text
    missing = run_cli(
        "cnnstudy-report", "nope", "--storage", f"sqlite:///{tmp_path}/optuna.db", cwd=tmp_path
    )
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert "STUDY=nope: no such study" in missing.stderr and "hidden_units" in missing.stderr
    nowhere = run_cli("cnnstudy-report", "x", "--storage", "sqlite:///absent.db", cwd=tmp_path)
    assert nowhere.returncode == 2 and not (tmp_path / "absent.db").exists()


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_each_run_logs_its_pictures_as_valid_images(tmp_path):
    _, (run,) = train_cli(
        tmp_path, "trainer=smoke", "logger.log_model=false", "logger.log_images=true"
    )
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    files = {f.path for f in client.list_artifacts(run.info.run_id, "pictures")}
    assert files == {
        "pictures/filters_conv1.png",
        "pictures/feature_maps_conv1.png",
        "pictures/confusion_matrix.png",
        "pictures/misclassified.png",
    }
    folder = Path(client.download_artifacts(run.info.run_id, "pictures", str(tmp_path / "p")))
    # seed example: 10 filters of 5x5, enlarged 9x to 45 px, 8 a row, 2 px borders
    assert _png_size((folder / "filters_conv1.png").read_bytes()) == (
        8 * 45 + 9 * 2,
        2 * 45 + 3 * 2,
    )
    # 10 feature maps of 28x28 (enlarged 1x: 48 // 28), 5 a row
    assert _png_size((folder / "feature_maps_conv1.png").read_bytes()) == (
        5 * 28 + 6 * 2,
        2 * 28 + 3 * 2,
    )
    assert _png_size((folder / "confusion_matrix.png").read_bytes()) == (650, 650)
    width, height = _png_size((folder / "misclassified.png").read_bytes())
    assert height == 136 and (width - 4) % 100 == 0 and 1 <= (width - 4) // 100 <= 16
    assert "time/pictures_s" in run.data.metrics

    elsewhere = tmp_path / "off"
    elsewhere.mkdir()
    _, (off,) = train_cli(
        elsewhere, "trainer=smoke", "logger.log_model=false", "logger.log_images=false"
    )
    off_client = mlflow.MlflowClient(f"sqlite:///{elsewhere}/mlflow.db")
    assert off_client.list_artifacts(off.info.run_id, "pictures") == []
    assert "time/pictures_s" not in off.data.metrics


def test_every_question_study_states_its_question_and_labels_its_parameters():
    from omegaconf import OmegaConf

    from cnnstudy.config.compose import compose

    files = sorted((REPO / "sweeps").glob("*.yaml"))
    names = {f.stem for f in files}
    assert {
        "hidden_units",
        "receptive_field",
        "stride_padding",
        "filters",
        "pooling",
        "dropout",
        "activation",
        "architecture",
    } <= names
    for path in files:
        data = yaml.safe_load(path.read_text())
        sweeper = data["hydra"]["sweeper"]
        question = sweeper["question"]
        assert path.read_text().splitlines()[0] == f"# Question: {question}", path.name
        space, _ = spaces.parse([f"{k}={v}" for k, v in sweeper["params"].items()])
        for key in [*sweeper["scientific"], *sweeper["nuisance"]]:
            assert key in space, (path.name, key)
        cfg = compose([f"sweep={path.stem}"])
        for key in space:
            assert OmegaConf.select(cfg, key, default="missing") != "missing", (path.name, key)


def _browser() -> str | None:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None and os.environ.get("CNNSTUDY_REQUIRE_BROWSER") == "1":
        pytest.fail("CNNSTUDY_REQUIRE_BROWSER=1 but chromium is not installed", pytrace=False)
    return found


def test_the_report_renders_in_headless_chromium_offline_with_no_console_error(tmp_path):
    browser = _browser()
    if browser is None:
        pytest.skip("chromium not installed (make test installs it; CNNSTUDY_REQUIRE_BROWSER=1)")
    from playwright.sync_api import sync_playwright

    made = _study(_curve(128))
    page_path = report.write_report(made, tmp_path / "report", storage="sqlite:///x.db")
    requests, problems = [], []
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"),  # a fresh user data dir
            executable_path=browser,
            headless=True,
            args=[
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        page = context.new_page()
        page.on("request", lambda r: requests.append(r.url))
        page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: problems.append(str(e)))
        page.goto(page_path.as_uri(), wait_until="load")
        shot = page.screenshot(full_page=True)
        images = page.eval_on_selector_all("img", "els => els.map(e => e.naturalWidth)")
        context.close()
    assert problems == []
    leaving = [u for u in requests if not u.startswith(("file://", "data:"))]
    assert leaving == []
    assert images and all(width > 0 for width in images)  # every figure decoded
    import io

    from PIL import Image, ImageStat

    picture = Image.open(io.BytesIO(shot)).convert("L")
    assert picture.size[1] > 1000
    assert ImageStat.Stat(picture).stddev[0] > 10  # not a blank page


def test_a_two_objective_study_draws_its_pareto_front_with_the_objectives_named(monkeypatch):
    made = optuna.create_study(directions=["maximize", "minimize"])
    made.set_user_attr("cnnstudy.objective", ["val/acc", "time/fit_s"])
    for k, units in enumerate([8, 16, 32, 64, 128, 256, 512]):
        made.add_trial(
            create_trial(
                params={"model.hidden_units": units},
                distributions={"model.hidden_units": UNITS},
                values=[0.9 + 0.01 * k, 1.0 + k * k],
            )
        )
    import optuna.visualization.matplotlib as ovm

    seen = {}
    real = ovm.plot_pareto_front

    def spy(study, **kwargs):
        seen.update(kwargs)
        return real(study, **kwargs)

    monkeypatch.setattr(ovm, "plot_pareto_front", spy)
    pictures = report.figures(analysis.analyse(made))
    assert seen["target_names"] == ["val/acc", "time/fit_s"]
    assert pictures["pareto.png"].startswith(b"\x89PNG\r\n\x1a\n")


def test_figures_are_legible_and_isolation_bins_sit_at_their_values():
    """Log axes label their decades only, legends sit below their plots, and numeric
    settings are placed at their values (log-spaced when they span more than 10x)."""
    from matplotlib.ticker import NullFormatter

    an = analysis.analyse(_study(_curve(128)))
    xs, log = report._positions(an)
    assert log and xs == sorted(xs)
    low, high = an.settings[0], an.settings[-1]
    assert xs[0] == pytest.approx((low.low * low.high) ** 0.5)
    assert xs[-1] == pytest.approx((high.low * high.high) ** 0.5)
    plt = report._matplotlib()
    figure, ax = plt.subplots()
    ax.plot([1e-3, 1e-2], [0, 1], label="Feasible")
    ax.set_xscale("log")
    ax.set_title("Parallel Coordinate Plot")
    ax.legend()
    report._tidy(figure)
    assert isinstance(ax.xaxis.get_minor_formatter(), NullFormatter)
    legend = ax.get_legend()
    assert legend._loc == 9 and legend.get_bbox_to_anchor()._bbox.y0 < 0  # below the axes
    plt.close(figure)


def test_the_report_tells_how_to_reproduce_a_trial_of_several_seeds():
    trials = [
        (params, value, {"mlflow_run_id": f"run{k}", "reproduce": "cnnstudy-train x=1"})
        for k, (params, value, _) in enumerate(_curve(128))
    ]
    an = analysis.analyse(_study(trials, seeds=2))
    page = report.render(an, {}, storage="sqlite:///x.db", parent_run="")
    best = an.best.user_attrs["mlflow_run_id"]
    assert f"Reproduce it, its 2 seeds: <code>cnnstudy-reproduce {best}</code>" in page
