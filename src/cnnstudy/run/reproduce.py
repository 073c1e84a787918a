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

    prefix: bool = False  # a pruned run: its history is the start of the new one's

    def matches(self, tolerance: float) -> bool:
        if not self.compared:
            return True
        if self.new is None:
            return False
        new_history = self.new_history
        if self.prefix:  # the stored run stopped early: the start of the new history
            new_history = new_history[: len(self.stored_history)]
            return self._agree(self.stored_history, new_history, tolerance)
        if len(self.stored_history) != len(new_history):
            return False
        return abs(self.stored - self.new) <= tolerance and self._agree(
            self.stored_history, new_history, tolerance
        )

    @staticmethod
    def _agree(stored: list, new: list, tolerance: float) -> bool:
        if len(stored) != len(new):
            return False
        steps_agree = [s for s, _ in stored] == [s for s, _ in new]
        pairs = zip(stored, new, strict=True)
        return steps_agree and all(abs(a - b) <= tolerance for (_, a), (_, b) in pairs)


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


def compare(client, stored_run_id: str, new_run_id: str, prefix: bool = False) -> list[Comparison]:
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
                prefix,
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


def stop_after(epochs: int):
    """A callback that stops training after `epochs` epochs, where a study's pruner
    stopped the stored run (after that epoch's validation)."""
    import lightning as L

    class StopAfterEpochs(L.Callback):
        def on_validation_end(self, trainer, pl_module) -> None:
            if trainer.current_epoch + 1 >= epochs:
                trainer.should_stop = True

    return StopAfterEpochs()


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
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help="a study's trial of several seeds: train only this seed again (default: each)",
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

    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(uri)
    try:
        run = client.get_run(args.run_id)
    except MlflowException as err:
        raise ConfigError(f"run {args.run_id} not found in {uri}: {err.message}") from None

    seeds = _seed_runs(client, run)
    if not seeds:
        if args.seed is not None:
            raise ConfigError(
                f"--seed {args.seed}: run {args.run_id} is one run, not a trial of seeds"
            )
        if not _reproduce(client, run, args, uri):
            sys.exit(1)
        return
    tags = run.data.tags
    if args.seed is not None:
        seeds = {k: v for k, v in seeds.items() if k == args.seed}
        if not seeds:
            raise ConfigError(
                f"--seed {args.seed}: trial {tags.get('cnnstudy.trial')} of study "
                f"{tags.get('cnnstudy.study')} trained seeds {tags.get('cnnstudy.seeds')}"
            )
    print(
        f"run {args.run_id} is trial {tags.get('cnnstudy.trial')} of study "
        f"{tags.get('cnnstudy.study')}, one run per seed: training seed(s) "
        f"{', '.join(str(k) for k in seeds)} again, each compared with its own run"
    )
    failed = [seed for seed, child in seeds.items() if not _reproduce(client, child, args, uri)]
    if failed:
        print(f"MISMATCH in seed(s) {', '.join(str(k) for k in failed)}")
        sys.exit(1)
    print(f"MATCH: every metric of {len(seeds)} seed run(s) agrees")


def _seed_runs(client, run) -> dict[int, object]:
    """A study's trial of several seeds: its seed runs by seed; else {}."""
    if run.data.tags.get("cnnstudy.run_kind") != "trial" or not run.data.tags.get("cnnstudy.seeds"):
        return {}
    children = client.search_runs(
        [run.info.experiment_id],
        f"tags.`mlflow.parentRunId` = '{run.info.run_id}'",
        max_results=1000,
    )
    found = {}
    for child in children:
        seed = child.data.tags.get("cnnstudy.seed", "")
        if child.data.tags.get("cnnstudy.run_kind") == "seed" and seed.lstrip("-").isdigit():
            found[int(seed)] = child
    return dict(sorted(found.items()))


def _epochs_trained(client, run) -> int:
    tagged = run.data.tags.get("cnnstudy.epochs_trained", "")
    if tagged.isdigit() and int(tagged) > 0:
        return int(tagged)
    return len(client.get_metric_history(run.info.run_id, "val/loss"))


def _reproduce(client, run, args: argparse.Namespace, uri: str) -> bool:
    """Train one run again and compare; whether every compared metric matches."""
    from cnnstudy.config.check import check
    from cnnstudy.data.files import check_files
    from cnnstudy.data.splits import load_splits
    from cnnstudy.run.context import RunRequest, requested
    from cnnstudy.run.train import summary, train

    run_id = run.info.run_id
    cfg = stored_config(client, run_id)
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
            return False
        print(f"data: same (fingerprint {data_now})")

    request = RunRequest(raise_config_errors=False)
    pruned = run.data.tags.get("cnnstudy.trial_state") == "PRUNED"
    if pruned:
        epochs = _epochs_trained(client, run)
        reason = run.data.tags.get("cnnstudy.stopped_reason", "pruned")
        print(
            f"run {run_id} was pruned by its study ({reason}): trained again to the same "
            f"point, {epochs} of trainer.max_epochs={cfg.trainer.max_epochs} epochs"
        )
        request.callbacks = [stop_after(epochs)]
    with requested(request):
        result = train(
            cfg,
            overrides,
            entry_point="cnnstudy-reproduce",
            extra_tags={"cnnstudy.reproduces": run_id},
            tracking_uri=uri,
        )

    rows = compare(client, run_id, result.run_id, prefix=pruned)
    print_table(rows, args.tolerance, f"run {run_id} reproduced as {result.run_id}")
    print(summary(result))
    from importlib import metadata

    if torch_then and torch_then != metadata.version("torch"):
        print(f"note: the run used torch {torch_then}, this one {metadata.version('torch')}")
    failed = [row.metric for row in rows if not row.matches(args.tolerance)]
    if failed:
        print(f"MISMATCH in {len(failed)} metric(s): {', '.join(failed)}")
        return False
    print(f"MATCH: all {sum(r.compared for r in rows)} compared metrics agree")
    return True


cli = console_script(main)

if __name__ == "__main__":
    main()
