"""What a study tells: a line per trial, and at the end the best trial (or the Pareto
front), `results.yaml` in the sweep folder, the dashboard link and the report."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from cnnstudy.errors import ConfigError
from cnnstudy.log import get as get_log
from cnnstudy.redact import redact_text
from cnnstudy.run.store import serialized
from cnnstudy.study.parent import describe_parent_run, landing_note
from cnnstudy.study.standing import best_trial, finished_count, pareto_front
from cnnstudy.study.trial import Outcome, Tracking, reproduce_command

log = get_log("study")


def trial_line(
    study: Any, trial: Any, outcome: Outcome, client: Any, tracking: Tracking, progress: str
) -> None:
    """The trial's line on the terminal (`progress`: finished of n_trials, and the ETA);
    the best so far on the parent run. The reason is whole, never cut."""
    best = best_trial(study)
    parent = tracking.parent_run_id
    names = study.user_attrs.get("cnnstudy.objective") or []
    value = " ".join(f"{v:.4f}" for v in outcome.values or [])
    if value and len(names) == 1:
        value = f"{names[0]} {value}"
    done, _, eta = progress.partition("  ")
    line = f"trial {trial.number:>3}  {done:>5}  {outcome.state:<8} {value}".rstrip()
    tags: dict[str, str] = {}
    if best is not None:
        line += f"  best {best.value:.4f} (trial {best.number})"
        tags = {"best.trial": str(best.number), "best.params": json.dumps(best.params)[:5000]}
    front = pareto_front(study)
    if front:
        numbers = ",".join(str(t.number) for t in front)
        line += f"  Pareto front: trials {numbers}"
        tags["pareto.trials"] = numbers[:5000]

    def note_best() -> None:  # other workers note theirs at the same moment: serialized
        from mlflow.entities import Metric, RunTag

        metrics = []
        if best is not None:
            now = int(time.time() * 1000)
            metrics = [Metric("best/value", best.value, now, trial.number)]
        client.log_batch(  # one request
            parent, metrics=metrics, tags=[RunTag(k, v) for k, v in tags.items()]
        )

    if tags:
        serialized(tracking.uri, note_best)
    line += f"  {outcome.seconds:.1f} s" + (f"  {eta}" if eta else "")
    if outcome.reason:
        line += f"  ({outcome.reason})"
    log.info(line)


def duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    return f"{minutes // 60} h {minutes % 60:02d} min"


def _reproduction(trial: Any, fixed: list[str]) -> dict[str, Any]:
    return {
        "trial": trial.number,
        "values": list(trial.values),
        "params": dict(trial.params),
        "mlflow_run_id": trial.user_attrs.get("mlflow_run_id", ""),
        "reproduce": reproduce_command(fixed, trial),
    }


def summarise(
    study: Any,
    *,
    settings: Any,
    tracking: Tracking,
    client: Any,
    sweep_dir: Path,
    fixed: list[str],
    timings: list[dict[str, float]],
    grid: Any,
    storage_url: str,
) -> list[Any]:
    """The end of a run of the study: best trial or Pareto front, results.yaml, the
    dashboard link, the report; exit 2 (ConfigError) when combinations of a grid did
    not finish."""
    import yaml

    best = best_trial(study)
    results: dict[str, Any] = {
        "study": study.study_name,
        "storage": redact_text(storage_url),
        "mlflow_parent_run_id": tracking.parent_run_id,
        "trials": len(study.trials),
        "finished": finished_count(study),
    }
    if best is not None:
        found = _reproduction(best, fixed)
        results.update(
            {
                "best_trial": best.number,
                "best_value": best.value,
                "best_params": found["params"],
                "best_mlflow_run_id": found["mlflow_run_id"],
                "reproduce": found["reproduce"],
            }
        )
        log.info(
            f"best: trial {best.number}, {settings.objectives[0]} {best.value:.4f}, "
            f"MLflow run {results['best_mlflow_run_id']}\nreproduce: {results['reproduce']}"
        )
    front = pareto_front(study)
    if front:
        results["pareto_front"] = [_reproduction(t, fixed) for t in front]
        log.info(f"Pareto front ({', '.join(settings.objectives)}):")
        for entry in results["pareto_front"]:
            values = " ".join(f"{v:.4f}" for v in entry["values"])
            log.info(f"  trial {entry['trial']}: {values}  {entry['reproduce']}")
    unfinished = grid.unfinished(study) if grid is not None else []
    if unfinished:
        results["unfinished"] = unfinished
    results["timings"] = timings
    sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep_dir / "results.yaml").write_text(yaml.safe_dump(results, sort_keys=False))
    link = trials_link(study, settings, tracking)
    log.info(f"results: {sweep_dir / 'results.yaml'}\nthe study's trials: {link}")
    if not settings.report:  # else the report writes it, with the answer
        note = landing_note(study, best, answer="", report=False)
        describe_parent_run(tracking.uri, tracking.parent_run_id, note)
    if settings.report:
        write_study_report(study, sweep_dir / "report", storage_url, tracking.uri)
    if unfinished:
        raise ConfigError(
            f"{len(unfinished)} of {len(grid.points)} combinations did not finish: "
            f"{'; '.join(unfinished)}. The same command retries the failed ones "
            "(a rejected one fails again until its config changes)"
        )
    return [results]


def write_study_report(study: Any, folder: Path, storage_url: str, tracking_uri: str) -> None:
    """The study's report (cnnstudy.study.report), logged to the parent run; a report
    that fails is said, and the study's results stand."""
    from cnnstudy.study.report import write_report

    try:
        page = write_report(study, folder, storage=storage_url, tracking_uri=tracking_uri)
    except Exception as err:  # noqa: BLE001 -- the trials are stored; say what failed
        log.error(f"cnnstudy: the report failed: {type(err).__name__}: {err}")
        return
    log.info(f"report: {page}")


def trials_link(study: Any, settings: Any, tracking: Tracking) -> str:
    """The dashboard's table of the study's trial runs, best first on the objective."""
    from cnnstudy.run.dashboard import runs_link, served_note

    name = study.study_name.replace("'", "")
    search = f"tags.`cnnstudy.study` = '{name}' and tags.`cnnstudy.run_kind` = 'trial'"
    order = f"metrics.`{settings.objectives[0]}`"
    ascending = settings.all_directions[0] == "minimize"
    link = runs_link(tracking.uri, tracking.experiment_id, search, order, ascending)
    return link + served_note(tracking.uri)
