"""`cnnstudy-report STUDY`: a study's answer as one self-contained HTML page (figures
embedded, no script, nothing fetched) plus PNG versions of its figures, logged to the
study's MLflow parent run. Written at the end of every sweep too.

    cnnstudy-report hidden_units                           # sqlite:///optuna.db, ./reports/
    cnnstudy-report hidden_units --storage sqlite:///s.db --out my_report
"""

from __future__ import annotations

import argparse
import base64
import html
import math
import re
import sys
import warnings
from pathlib import Path
from typing import Any

from cnnstudy.errors import ConfigError, console_script, report, user_errors_exit
from cnnstudy.log import get as get_log
from cnnstudy.redact import redact_text
from cnnstudy.study.parent import describe_parent_run, landing_note
from cnnstudy.study.settings import DEFAULT_STORAGE

log = get_log("study")


def _matplotlib() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"figure.dpi": 100, "font.size": 9, "axes.grid": True})
    return plt


def _png(figure: Any) -> bytes:
    import io

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", bbox_inches="tight")
    _matplotlib().close(figure)
    return buffer.getvalue()


def _positions(an: Any) -> tuple[list[float], bool]:
    """x of each setting: a numeric setting at its values' middle (on a log scale when
    they span more than 10x), so that bins are spaced as their values are; else 0, 1, ..."""
    import math

    if any(s.low is None for s in an.settings):
        return list(range(len(an.settings))), False
    log = min(s.low for s in an.settings) > 0 and (
        max(s.high for s in an.settings) / min(s.low for s in an.settings) > 10
    )
    if log:
        return [math.sqrt(s.low * s.high) for s in an.settings], True
    return [(s.low + s.high) / 2 for s in an.settings], False


def _isolation(an: Any) -> bytes:
    plt = _matplotlib()
    figure, ax = plt.subplots(figsize=(6.4, 3.6))
    xs, log = _positions(an)
    ys = [s.best_value for s in an.settings]
    sign = 1 if an.maximize else -1
    top = next(s for s in an.settings if s.difference is None)
    low, high = [], []
    for s in an.settings:  # where this setting's best may lie, against the best setting's
        d = s.difference
        if d is None:
            low.append(0.0)
            high.append(0.0)
            continue
        near, far = top.best_value - sign * d.interval[0], top.best_value - sign * d.interval[1]
        low.append(max(0.0, s.best_value - min(near, far)))
        high.append(max(0.0, max(near, far) - s.best_value))
    ax.errorbar(xs, ys, yerr=[low, high], fmt="o-", capsize=4)
    for x, s in zip(xs, an.settings, strict=True):
        ax.scatter([x] * len(s.values), s.values, color="grey", alpha=0.35, s=12, zorder=0)
    if log:
        ax.set_xscale("log")
    ax.set_xticks(xs, [s.label for s in an.settings])
    ax.minorticks_off()
    ax.set_xlabel(an.scientific)
    ax.set_ylabel(f"best {an.objective}")
    tuned = ", ".join(an.nuisance) or "none"
    ax.set_title(
        f"isolation: best {an.objective} per setting (tuned: {tuned}); grey: every trial\n"
        "bars: 95% interval of each setting's best against the best setting's (permutation "
        "test, inverted)",
        fontsize=8,
    )
    return _png(figure)


def _edf(an: Any) -> bytes:
    plt = _matplotlib()
    figure, ax = plt.subplots(figsize=(6.4, 3.6))
    for s in an.settings:
        line = ax.plot(s.edf_x, s.edf, label=f"{an.scientific}={s.label} (n={len(s.values)})")
        ax.fill_between(
            s.edf_x, s.edf_band[0], s.edf_band[1], alpha=0.15, color=line[0].get_color()
        )
    ax.set_xlabel(an.error_name)
    ax.set_ylabel("fraction of trials with error below x")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7)
    ax.set_title("error EDF per setting, shaded: bootstrap 95% band", fontsize=8)
    return _png(figure)


def _params_scatter(an: Any) -> bytes | None:
    points = [(t.user_attrs.get("metrics", {}).get("model/params"), t.values[0]) for t in an.trials]
    points = [(p, v) for p, v in points if p]
    if not points:
        return None
    plt = _matplotlib()
    figure, ax = plt.subplots(figsize=(6.4, 3.6))
    ax.scatter([p for p, _ in points], [v for _, v in points], s=16)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel(an.objective)
    ax.set_title(f"{an.objective} against the network's size", fontsize=8)
    return _png(figure)


def _optuna_plot(kind: str, study: Any, **kwargs: Any) -> bytes | None:
    """One of optuna.visualization.matplotlib's figures, or None where it has nothing to
    draw (too few trials or parameters)."""
    import optuna.visualization.matplotlib as ovm

    plt = _matplotlib()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = getattr(ovm, kind)(study, **kwargs)
    except (ValueError, RuntimeError, ZeroDivisionError, IndexError):
        return None
    axes = result.ravel()[0] if hasattr(result, "ravel") else result
    figure = axes.get_figure()
    if figure is None or not figure.axes or not any(a.has_data() for a in figure.axes):
        plt.close("all")
        return None
    figure.set_size_inches(max(6.4, figure.get_size_inches()[0]), 4.0)
    _tidy(figure)
    return _png(figure)


def _tidy(figure: Any) -> None:
    """Optuna's figures, made legible: a log axis labels its decades only (its minor
    labels, 2x10^-3, 3x10^-3, ..., ran into each other), and a legend sits below the
    plot, not over its title."""
    from matplotlib.ticker import NullFormatter

    for ax in figure.axes:
        for axis, scale in ((ax.xaxis, ax.get_xscale()), (ax.yaxis, ax.get_yscale())):
            if scale == "log":
                axis.set_minor_formatter(NullFormatter())
        legend = ax.get_legend()
        if legend is not None and ax.get_title():
            handles, labels = ax.get_legend_handles_labels()
            if handles:
                ax.legend(
                    handles,
                    labels,
                    loc="upper center",
                    bbox_to_anchor=(0.5, -0.28),
                    ncol=len(labels),
                    fontsize=7,
                    frameon=False,
                )


def figures(an: Any) -> dict[str, bytes]:
    """PNG bytes by file name, in the order the report shows them."""
    import optuna

    from cnnstudy.study.analysis import importances

    study = an.study
    target = {"target": lambda t: t.values[0], "target_name": an.objective}
    single = len(study.directions) == 1
    # Optuna's plots warn on its logger when a study has no complete trial: the report
    # says what it has in its counts instead
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    out: dict[str, bytes | None] = {}
    if an.settings:
        out["isolation.png"] = _isolation(an)
        out["edf.png"] = _edf(an)
    out["importances.png"] = _optuna_plot("plot_param_importances", study, **target)
    out["history.png"] = _optuna_plot(
        "plot_optimization_history", study, **({} if single else target)
    )
    out["slice.png"] = _optuna_plot("plot_slice", study, **({} if single else target))
    ranked = list(importances(study))
    if len(ranked) >= 2:
        out["contour.png"] = _optuna_plot(
            "plot_contour", study, params=ranked[:2], **({} if single else target)
        )
    out["parallel.png"] = _optuna_plot(
        "plot_parallel_coordinate", study, **({} if single else target)
    )
    if not single:
        names = [str(o) for o in study.user_attrs.get("cnnstudy.objective") or []]
        named = {"target_names": names} if len(names) == len(study.directions) else {}
        out["pareto.png"] = _optuna_plot("plot_pareto_front", study, **named)
    out["params.png"] = _params_scatter(an)
    return {k: v for k, v in out.items() if v}


CAPTIONS = {
    "isolation.png": "Isolation plot: the best result at each setting of the scientific "
    "parameter, nuisance parameters tuned.",
    "edf.png": "Error EDFs: the share of trials at each setting whose error is below x; a "
    "curve further left and higher is a better design space (Radosavovic et al.).",
    "importances.png": "Parameter importances (Optuna's default, PED-ANOVA).",
    "history.png": "Optimization history.",
    "slice.png": "Slices: the objective against each parameter.",
    "contour.png": "Contour of the two most important parameters.",
    "parallel.png": "Parallel coordinates.",
    "pareto.png": "Pareto front of the objectives.",
    "params.png": "The objective against the network's trainable parameters.",
}

STYLE = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;max-width:960px;margin:2em auto;
padding:0 1em;color:#1d1d1f;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em}h2{font-size:1.15em;margin-top:1.8em;border-bottom:1px
solid #ddd}.answer{font-size:1.15em;background:#f1f6ff;border-left:4px solid #2f6fde;
padding:.8em 1em}.small{background:#fff4e5;border-left-color:#e08a00}.warn{background:#fff4e5;
border-left:4px solid #e08a00;padding:.5em 1em;margin:.4em 0}table{border-collapse:collapse;
font-size:.9em}td,th{border:1px solid #ddd;padding:.25em .6em;text-align:right}th{background:
#f6f6f6}td:first-child,th:first-child{text-align:left}code{background:#f4f4f4;padding:.1em .3em;
word-break:break-all}figure{margin:1.2em 0}figure img{max-width:100%}figcaption{font-size:.85em;
color:#555}.meta{color:#555;font-size:.9em}
"""


HOW = (
    "Each setting against the best one, by a permutation test of the best trial's value "
    "(the trials' setting labels shuffled 2,000 times; first all settings at once, then "
    "each, Holm-corrected); the interval inverts the same test, so it can fall on either "
    "side of the observed difference. Numeric settings are bins of about equal numbers of "
    "trials."
)


def _run_link(trial: Any, study: Any, tracking_uri: str | None) -> str:
    """The trial's number, a link to its MLflow run when the study has one."""
    run = trial.user_attrs.get("mlflow_run_id", "")
    if not run or not tracking_uri:
        return str(trial.number)
    from cnnstudy.run.dashboard import run_link

    experiment = study.user_attrs.get("cnnstudy.mlflow_experiment_id", "")
    if not experiment:
        return str(trial.number)
    href = html.escape(run_link(tracking_uri, experiment, run))
    return f"<a href='{href}'>{trial.number}</a>"


def render(
    an: Any,
    pictures: dict[str, bytes],
    *,
    storage: str,
    parent_run: str,
    tracking_uri: str | None = None,
) -> str:
    """The HTML page: every figure inline as a data: URI, no script, no external link."""
    from cnnstudy.study import verdict
    from cnnstudy.study.analysis import _fmt, _fmt_diff, importances, untuned_warnings

    e = html.escape
    study = an.study
    best = an.best
    title = f"Study {study.study_name}"
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>{e(title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{e((an.question[:1].upper() + an.question[1:]) or title)}</h1>",
        f"<p class='meta'>Study <b>{e(study.study_name)}</b> in {e(redact_text(storage))}; "
        f"MLflow parent run {e(parent_run or 'none')}. Objective {e(an.objective)} "
        f"({'maximized' if an.maximize else 'minimized'}), selected on validation data. "
        f"Scientific: {e(an.scientific or 'none')}; nuisance (tuned): "
        f"{e(', '.join(an.nuisance) or 'none')}; fixed: everything else.</p>",
        f"<p class='answer{' small' if an.too_small else ''}'>{e(an.answer)}</p>",
    ]
    for warning in an.edges:
        parts.append(f"<p class='warn'>Edge of the search space: {e(warning)}.</p>")
    for warning in untuned_warnings(an):
        parts.append(f"<p class='warn'>Confounded: {e(warning)}.</p>")
    c = an.counts
    parts.append(
        f"<p class='meta'>{c['trials']} trials: {c['complete']} complete, {c['pruned']} pruned, "
        f"{c['rejected']} rejected by the shape check, {c['failed']} failed; "
        f"{an.seeds} seed(s) per configuration.</p>"
    )
    if an.settings:
        parts.append(
            f"<h2>{e(an.scientific)}: each setting</h2><p class='meta'>{e(HOW)}</p>"
            "<table><tr><th>setting</th><th>trials</th><th>best</th>"
            "<th>worse than the best by (95% interval)</th><th>p (Holm)</th>"
            "<th>mean of all</th><th>best trial</th></tr>"
        )
        for s in an.settings:
            d = s.difference
            if an.p_all is None:  # too small to test at all
                gap, p = "—", ""
            elif d is None:
                gap, p = "the best setting", ""
            elif math.isnan(d.interval[0]):
                gap, p = _fmt_diff(d.difference, an.objective), f"{d.p:.3f}"
            else:
                lo, hi = (_fmt_diff(v, an.objective) for v in d.interval)
                gap, p = f"{_fmt_diff(d.difference, an.objective)} ({lo} to {hi})", f"{d.p:.3f}"
            if d is not None and d.worse:
                gap += " — worse"
            parts.append(
                f"<tr><td>{e(s.label)}</td><td>{len(s.values)}</td>"
                f"<td>{e(_fmt(s.best_value, an.objective))}</td><td>{e(gap)}</td>"
                f"<td>{p}</td><td>{e(_fmt(sum(s.values) / len(s.values), an.objective))}</td>"
                f"<td>{_run_link(s.best, study, tracking_uri)}</td></tr>"
            )
        parts.append("</table>")
        if an.rates is not None:
            false, power = an.rates
            parts.append(
                f"<p class='meta'>At this budget the test finds a difference of "
                f"{verdict.EFFECT:g} seed s.d. {100 * power:.0f}% of the time and calls a "
                f"setting worse by chance {100 * false:.1f}% of the time "
                f"({verdict.SIMULATED} simulated studies each; README: Reports).</p>"
            )
    if best is not None:
        command = best.user_attrs.get("reproduce", "")
        run = best.user_attrs.get("mlflow_run_id", "")
        params = ", ".join(f"{k}={v}" for k, v in best.params.items())
        parts.append(
            f"<h2>Best trial</h2><p>Trial {_run_link(best, study, tracking_uri)}: "
            f"{e(an.objective)} {e(_fmt(best.values[0], an.objective))} with {e(params)}; "
            f"MLflow run {e(run or 'unknown')}.</p>"
        )
        if run and an.seeds > 1:
            parts.append(
                f"<p>Reproduce it, its {an.seeds} seeds: <code>cnnstudy-reproduce "
                f"{e(run)}</code>; or train its first seed: <code>{e(command)}</code></p>"
            )
        elif command:
            parts.append(f"<p>Reproduce it: <code>{e(command)}</code> (seed: the config's)</p>")
        kept = best.user_attrs.get("metrics", {})
        test = kept.get("test/acc")
        if test is not None:
            parts.append(
                f"<p class='meta'>Its test accuracy (reported, never selected on): "
                f"{100 * test:.2f}%.</p>"
            )
        elif kept.get("test/rmse") is not None:  # a regression
            scores = ", ".join(
                f"{name} {kept[f'test/{name}']:.4g}"
                for name in ("rmse", "mae", "r2")
                if kept.get(f"test/{name}") is not None
            )
            parts.append(
                f"<p class='meta'>Its test scores (reported, never selected on): {e(scores)}.</p>"
            )
    imp = importances(study)
    if imp:
        rows = "".join(f"<tr><td>{e(k)}</td><td>{v:.3f}</td></tr>" for k, v in imp.items())
        parts.append(
            f"<h2>Importances</h2><table><tr><th>parameter</th><th>importance</th>"
            f"</tr>{rows}</table>"
        )
    parts.append("<h2>Figures</h2>")
    for name, data in pictures.items():
        encoded = base64.b64encode(data).decode()
        caption = CAPTIONS.get(name, name)
        parts.append(
            f"<figure><img alt='{e(caption)}' src='data:image/png;base64,{encoded}'>"
            f"<figcaption>{e(caption)} ({e(name)})</figcaption></figure>"
        )
    parts.append("</body></html>")
    return "\n".join(parts)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")[:80] or "study"


def write_report(
    study: Any,
    out_dir: Path,
    *,
    storage: str,
    tracking_uri: str | None = None,
    link_uri: str | None = None,
) -> Path:
    """Write index.html and the PNGs to out_dir; log both to the study's MLflow parent
    run when there is one (and tracking_uri is given). The HTML's path."""
    from cnnstudy.study.analysis import analyse

    an = analyse(study)
    pictures = figures(an)
    parent = str(study.user_attrs.get("cnnstudy.mlflow_parent_run_id", ""))
    html_text = render(
        an, pictures, storage=storage, parent_run=parent, tracking_uri=link_uri or tracking_uri
    )
    page = out_dir / "index.html"
    try:  # the local files: a folder that cannot be written is the user's to change
        out_dir.mkdir(parents=True, exist_ok=True)
        for name, data in pictures.items():
            (out_dir / name).write_bytes(data)
        page.write_text(html_text, encoding="utf-8")
    except OSError as err:
        raise ConfigError(
            f"--out {out_dir}: cannot write the report there ({err.strerror or err}); give a "
            "folder you can write"
        ) from None
    if parent and tracking_uri:
        import mlflow

        client = mlflow.MlflowClient(tracking_uri)
        client.log_artifacts(parent, str(out_dir), "report")
        client.set_tag(parent, "cnnstudy.answer", an.answer[:5000])
        best = an.best if len(study.directions) == 1 else None
        note = landing_note(study, best, answer=an.answer, report=True)
        describe_parent_run(tracking_uri, parent, note)
    return page


def _load(name: str, storage: str) -> Any:
    import optuna

    from cnnstudy.locks import store_lock
    from cnnstudy.run.store import check_store
    from cnnstudy.study.storage import make_storage

    journal = storage.removeprefix("journal://")
    is_journal = storage.startswith("journal://") or "://" not in storage
    if not is_journal:
        check_store(storage, create=False)  # a report never creates a store
    if is_journal and not Path(journal).is_file():
        raise ConfigError(
            f"--storage {storage}: no such journal file ({Path(journal).resolve()}); a report "
            "reads a study, it creates nothing. Give the storage your study is in"
        )
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with store_lock(storage):
        try:
            return optuna.load_study(study_name=name, storage=make_storage(storage))
        except KeyError:
            names = optuna.get_all_study_names(make_storage(storage))
            raise ConfigError(
                f"STUDY={name}: no such study in {redact_text(storage)}; it has: "
                f"{', '.join(names) or 'none'}"
            ) from None


def main(argv: list[str] | None = None) -> None:
    """cnnstudy-report. Exit codes: 0 written, 2 a user error (no such store or study)."""
    import os

    parser = argparse.ArgumentParser(
        prog="cnnstudy-report",
        description="Write a study's report (HTML + PNG) and log it to its MLflow parent run.",
    )
    parser.add_argument("study", help="the study's name (a sweep's name, or see --list)")
    parser.add_argument("--storage", default=DEFAULT_STORAGE, help="Optuna storage URL")
    parser.add_argument("--out", default=None, help="folder for the report (reports/STUDY)")
    parser.add_argument(
        "--tracking-uri",
        default=os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db"),
        help="MLflow store of the study's parent run ($MLFLOW_TRACKING_URI)",
    )
    parser.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    _write(parser.parse_args(argv))


@user_errors_exit
def _write(args: argparse.Namespace) -> None:
    study = _load(args.study, args.storage)
    out = Path(args.out or Path("reports") / _slug(args.study))
    uri = None
    if not args.no_mlflow and study.user_attrs.get("cnnstudy.mlflow_parent_run_id"):
        from cnnstudy.run.store import check_store

        try:
            check_store(args.tracking_uri, create=False)
            uri = args.tracking_uri
        except ConfigError as err:
            report(f"not logged to MLflow: {err}")
    page = write_report(
        study, out, storage=args.storage, tracking_uri=uri, link_uri=args.tracking_uri
    )
    log.info(f"report: {page}")
    if uri:
        log.info(f"logged to the study's MLflow parent run under report/ ({redact_text(uri)})")


cli = console_script(main)

if __name__ == "__main__":
    main(sys.argv[1:])
