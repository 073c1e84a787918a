"""cnnstudy-reproduce RUN_ID: train a logged run again from its stored config and compare.

    cnnstudy-reproduce 58d583c5d4bf40518e3ca3fff7bf31fd
    cnnstudy-reproduce RUN_ID --tolerance 1e-6     # GPU runs are not bitwise reproducible

Reads config.yaml from the run, trains it with the same seed and data split (as a
new MLflow run tagged cnnstudy.reproduces=RUN_ID), and prints, metric by metric,
the stored value, the new value and whether they match. Exit code 0 when every
metric matches, 1 when one does not, 2 for a user error (unknown run, bad store).
Every metric's whole history is compared, not only its last value; timing metrics
(images/s, seconds) are shown but never compared.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf

from cnnstudy.config.schema import TrainConfig
from cnnstudy.errors import ConfigError, console_script, user_errors_exit


@dataclass
class Comparison:
    metric: str
    stored: float
    new: float | None
    compared: bool
    stored_history: list[tuple[int, float]]
    new_history: list[tuple[int, float]]

    def matches(self, tolerance: float) -> bool:
        if not self.compared:
            return True
        if self.new is None or len(self.stored_history) != len(self.new_history):
            return False
        pairs = [
            (self.stored, self.new),
            *zip(
                [v for _, v in self.stored_history], [v for _, v in self.new_history], strict=True
            ),
        ]
        steps_agree = [s for s, _ in self.stored_history] == [s for s, _ in self.new_history]
        return steps_agree and all(abs(a - b) <= tolerance for a, b in pairs)


def stored_config(client, run_id: str) -> DictConfig:
    """The run's config.yaml, checked against today's schema."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        text = mlflow.artifacts.load_text(f"runs:/{run_id}/config.yaml")
    except (MlflowException, OSError) as err:
        raise ConfigError(f"run {run_id} has no readable config.yaml artifact: {err}") from None
    stored = OmegaConf.create(text)
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), stored)
    except Exception as err:  # noqa: BLE001 -- OmegaConf raises several kinds; all mean the same
        raise ConfigError(
            f"run {run_id}: its config.yaml no longer fits the schema: {err}"
        ) from None
    # Runs logged before one form per size (cnnstudy 0.1): an empty list meant "not given",
    # and a given list won over the scalar keys, which were stored beside it.
    for explicit, scalars in (
        ("filters_per_stage", ("filters", "filter_growth")),
        ("hidden_units_per_layer", ("hidden_units", "hidden_growth")),
    ):
        if cfg.model[explicit] is not None and len(cfg.model[explicit]) == 0:
            cfg.model[explicit] = None
        elif cfg.model[explicit] is not None:
            for key in scalars:
                cfg.model[key] = None
    return cfg


def compare(client, stored_run_id: str, new_run_id: str) -> list[Comparison]:
    """Every metric of the stored run, its latest value and its whole history, against the new."""
    from cnnstudy.run.train import is_timing

    def history(run_id: str, name: str) -> list[tuple[int, float]]:
        return [(m.step, m.value) for m in client.get_metric_history(run_id, name)]

    stored = client.get_run(stored_run_id).data.metrics
    new = client.get_run(new_run_id).data.metrics
    rows = []
    for name, value in sorted(stored.items()):
        compared = not is_timing(name)
        rows.append(
            Comparison(
                name,
                value,
                new.get(name),
                compared,
                history(stored_run_id, name) if compared else [],
                history(new_run_id, name) if compared else [],
            )
        )
    return rows


def print_table(rows: list[Comparison], tolerance: float, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in ("metric", "stored", "new", "match"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    for row in rows:
        new = "missing" if row.new is None else f"{row.new:.10g}"
        verdict = "(timing)" if not row.compared else ("yes" if row.matches(tolerance) else "NO")
        table.add_row(row.metric, f"{row.stored:.10g}", new, verdict)
    Console().print(table)


@user_errors_exit
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="cnnstudy-reproduce",
        description="Train a logged run again from its stored config and compare its metrics.",
    )
    parser.add_argument("run_id", help="the MLflow run id to reproduce")
    parser.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow store holding the run, where the new run is logged too "
        "(default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)",
    )
    parser.add_argument(
        "--tolerance",
        type=float,
        default=0.0,
        help="largest absolute difference counted as a match (default: 0, exact)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from cnnstudy.run import store

    # the store named here is the one read from and written to, MLFLOW_TRACKING_URI or not
    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    store.check_store(uri, create=False)  # reading creates no store

    import mlflow
    from mlflow.exceptions import MlflowException

    from cnnstudy.config.check import check
    from cnnstudy.data.files import check_files
    from cnnstudy.data.splits import load_splits
    from cnnstudy.run.train import summary, train

    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(uri)
    try:
        run = client.get_run(args.run_id)
    except MlflowException as err:
        raise ConfigError(f"run {args.run_id} not found in {uri}: {err.message}") from None

    cfg = stored_config(client, args.run_id)
    cfg.logger.tracking_uri = uri  # the stored one may be redacted; the re-run lands beside it
    cfg.logger.experiment_name = client.get_experiment(run.info.experiment_id).name
    cfg.logger.run_name = f"reproduce {run.info.run_name}"
    if args.no_progress:
        cfg.trainer.progress_bar = False
    threads = run.data.tags.get("cnnstudy.torch_threads", "")
    if threads.isdigit():
        # the fused conv kernel sums its weight gradient per thread: the same count, the
        # same sums (the stored config may say 0, torch's default on that machine)
        cfg.trainer.num_threads = int(threads)
    overrides = run.data.tags.get("cnnstudy.overrides", "").split()
    torch_then = run.data.tags.get("cnnstudy.version.torch")

    data_then = run.data.tags.get("cnnstudy.data_fingerprint")
    if data_then:  # the data first: a different dataset is not worth training on
        check(cfg)
        check_files(cfg.data)
        data_now = load_splits(cfg.data).fingerprint
        if data_now != data_then:
            print(f"data: DIFFERENT (fingerprint {data_then} then, {data_now} now)")
            print("MISMATCH in the data fingerprint: not trained again")
            sys.exit(1)
        print(f"data: same (fingerprint {data_now})")

    result = train(
        cfg,
        overrides,
        entry_point="cnnstudy-reproduce",
        extra_tags={"cnnstudy.reproduces": args.run_id},
        tracking_uri=uri,
    )

    rows = compare(client, args.run_id, result.run_id)
    print_table(rows, args.tolerance, f"run {args.run_id} reproduced as {result.run_id}")
    print(summary(result))
    from importlib import metadata

    if torch_then and torch_then != metadata.version("torch"):
        print(f"note: the run used torch {torch_then}, this one {metadata.version('torch')}")
    failed = [row.metric for row in rows if not row.matches(args.tolerance)]
    if failed:
        print(f"MISMATCH in {len(failed)} metric(s): {', '.join(failed)}")
        sys.exit(1)
    print(f"MATCH: all {sum(r.compared for r in rows)} compared metrics agree")


cli = console_script(main)

if __name__ == "__main__":
    main()
