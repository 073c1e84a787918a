"""The study sweeper's overhead: a study of N trials against the same N train() calls;
and trials per minute with 1 and 2 worker processes.

    .venv/bin/python benchmarks/sweeper.py                 # 20 trials
    .venv/bin/python benchmarks/sweeper.py --trials 200    # sampler + storage at trial 200
    .venv/bin/python benchmarks/sweeper.py --parallel      # n_jobs=1 against n_jobs=2
    .venv/bin/python benchmarks/sweeper.py --components    # a trial's fixed cost, per part
    .venv/bin/python benchmarks/sweeper.py --components --tracking http://127.0.0.1:5050 \
        --storage postgresql+psycopg://cnnstudy@127.0.0.1:5432/cnnstudy_optuna   # the services

(s) `cnnstudy-train -m sweep=hidden_units` with a minimal training budget (two batches,
one validation batch), SQLite storage; (d) a fresh process making the same trials'
train() calls directly, with the same overrides. Both are whole processes (imports
included); the overhead per trial is ((s) - (d)) / N: sampler, storage, MLflow parent and
child bookkeeping, Hydra's job set-up. Sampler + storage time (ask + tell) is read from the
study's own timings for the first and the last 10 trials.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

BIN = Path(sys.executable).parent
BUDGET = ["trainer=smoke", "logger.log_model=false", "trainer.num_threads=1"]
QUIET = {"MLFLOW_DISABLE_TELEMETRY": "true"}  # as cnnstudy's commands set it, in both


def run_study(where: Path, trials: int, extra: list[str] = ()) -> tuple[float, dict]:
    args = [
        str(BIN / "cnnstudy-train"),
        "-m",
        "sweep=hidden_units",
        f"hydra.sweeper.n_trials={trials}",
        f"hydra.sweeper.storage=sqlite:///{where}/optuna.db",
        f"logger.artifact_location={where}/a",
        *BUDGET,
        *extra,
    ]
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{where}/mlflow.db", "PATH": str(BIN), **QUIET}
    started = time.perf_counter()
    done = subprocess.run(args, cwd=where, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(done.stderr[-3000:])
    (results,) = where.glob("multirun/*/*/results.yaml")
    return seconds, yaml.safe_load(results.read_text())


DIRECT = """
import sys, time, optuna
from cnnstudy.config.compose import compose
from cnnstudy.run.train import train
where, budget = sys.argv[1], sys.argv[2:]
study = optuna.load_study(study_name="hidden_units", storage=f"sqlite:///{where}/optuna.db")
for trial in study.trials:
    overrides = [f"{k}={v}" for k, v in trial.params.items()]
    cfg = compose(["sweep=hidden_units", *budget, *overrides,
                   f"logger.tracking_uri=sqlite:///{where}/direct.db",
                   f"logger.artifact_location={where}/d"])
    train(cfg)
"""


def run_direct(where: Path) -> float:
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", DIRECT, str(where), *BUDGET],
        cwd=where,
        capture_output=True,
        text=True,
        env={"PATH": str(BIN), **QUIET},
    )
    if done.returncode != 0:
        sys.exit(done.stderr[-3000:])
    return time.perf_counter() - started


# ten epochs over the whole digits training split per trial, one torch thread per process
PARALLEL_BUDGET = [
    "trainer.limit_train_batches=null",
    "trainer.limit_val_batches=null",
    "trainer.limit_test_batches=null",
    "trainer.max_epochs=10",
]


def parallel(trials: int) -> None:
    rates = {}
    for jobs in (1, 2):
        with tempfile.TemporaryDirectory() as tmp:
            extra = [*PARALLEL_BUDGET, f"hydra.sweeper.n_jobs={jobs}"]
            if jobs == 1:
                extra.append("trainer.num_threads=1")  # each worker 1 thread, as with 2
            seconds, _ = run_study(Path(tmp), trials, extra)
        rates[jobs] = trials / seconds * 60
        print(f"n_jobs={jobs}: {trials} trials in {seconds:.1f} s, {rates[jobs]:.1f} trials/min")
    print(f"2 workers / 1 worker: {rates[2] / rates[1]:.2f} (goal: at least 1.6)")


COMPONENTS = """
import collections, functools, os, sys, time
where, trials, tracking, storage = sys.argv[1:5]
spent = collections.defaultdict(float)
calls = collections.Counter()
trials_done = [0]

EPOCHS = "epochs: their batches, validation, metrics logged"
TEST = "epochs: the test batches"

def timed(owner, name, label):
    inner = getattr(owner, name)
    @functools.wraps(inner)
    def wrapper(*args, **kwargs):
        counted = trials_done[0] >= 1  # the first trial pays for imports: left out
        started = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            if counted:
                spent[label] += time.perf_counter() - started
                calls[label] += 1
            if label.startswith("trial"):
                trials_done[0] += 1
    setattr(owner, name, wrapper)

import hydra._internal.core_plugins.basic_launcher as basic
import hydra.core.utils as hydra_utils
import lightning as L
import mlflow
import cnnstudy.data.batches as batches
import cnnstudy.run.train as train_module
import cnnstudy.run.tracking as tracking_module
import cnnstudy.study.loop as loop
import cnnstudy.study.trial as trial_module
import cnnstudy.study.summary as summary
timed(trial_module.TrialRunner, "run", "trial (all of it)")
timed(trial_module.TrialRunner, "job_config", "compose + shape check config (Hydra)")
timed(hydra_utils, "_save_config", "Hydra job: .hydra/*.yaml")
timed(train_module, "train", "train() (all of it)")
timed(L.Trainer, "fit", "Lightning fit (3 epochs: 2 batches + 1 val)")
timed(L.Trainer, "test", "Lightning test (1 batch)")
timed(mlflow, "start_run", "MLflow start_run")
timed(train_module, "record_setup", "MLflow params, config and plan")
timed(train_module.store, "open_experiment", "MLflow experiment look-up")
timed(train_module, "mark_orphans", "MLflow orphan check")
timed(batches.ImageDataModule, "prepare", "data: load splits (cached)")
from lightning.pytorch.loops.evaluation_loop import _EvaluationLoop
from lightning.pytorch.loops.training_epoch_loop import _TrainingEpochLoop
timed(_TrainingEpochLoop, "run", EPOCHS)  # its batches, the validation run inside it
test_run = _EvaluationLoop.run
def evaluation_run(self):
    if not self.trainer.testing:  # a validation run: inside a training epoch, timed there
        return test_run(self)
    started = time.perf_counter()
    try:
        return test_run(self)
    finally:
        if trials_done[0] >= 1:
            spent[TEST] += time.perf_counter() - started
            calls[TEST] += 1
_EvaluationLoop.run = evaluation_run
timed(loop.StudyRunner, "_ask", "Optuna ask (under the lock)")
timed(trial_module.TrialRunner, "finish", "Optuna tell + trial attributes")
timed(loop, "trial_line", "trial line + parent run's best")
timed(trial_module, "end_runs", "MLflow end runs")
sys.argv = ["cnnstudy-train", "-m", "sweep=hidden_units", f"hydra.sweeper.n_trials={trials}",
            f"hydra.sweeper.storage={storage}",
            f"hydra.sweeper.study_name=components-{os.getpid()}",
            f"logger.artifact_location={where}/a", "trainer=smoke", "logger.log_model=false",
            "trainer.num_threads=1", "hydra.sweeper.report=false", "logger.log_images=false",
            f"logger.experiment_name=components-{os.getpid()}"]
os.environ["MLFLOW_TRACKING_URI"] = tracking
from cnnstudy.run.train import main
try:
    main()
except SystemExit:
    pass
n = calls["trial (all of it)"]
print(f"per trial, mean over {n} trials after the first (wall clock, no profiler):")
for label, seconds in sorted(spent.items(), key=lambda kv: -kv[1]):
    print(f"  {label:50s} {seconds / n * 1000:8.1f} ms  ({calls[label]} calls)")
fixed = spent["trial (all of it)"] - spent[EPOCHS] - spent[TEST]
label = "fixed cost: all of it less its epochs"
print(f"  {label:50s} {fixed / n * 1000:8.1f} ms  (goal: 300)")
"""


def components(trials: int, tracking: str | None, storage: str | None) -> None:
    """A study run in this benchmark's child process with a wall-clock timer around each
    part of a trial: what a trial costs besides its epochs, part by part."""
    with tempfile.TemporaryDirectory() as tmp:
        uri = tracking or f"sqlite:///{tmp}/mlflow.db"
        done = subprocess.run(
            [
                sys.executable,
                "-c",
                COMPONENTS,
                tmp,
                str(trials),
                uri,
                storage or f"sqlite:///{tmp}/optuna.db",
            ],
            cwd=tmp,
            capture_output=True,
            text=True,
            env={"PATH": str(BIN), "OMP_NUM_THREADS": "1", **QUIET},
        )
    if done.returncode != 0:
        sys.exit(done.stderr[-3000:])
    where = "the tracking server" if tracking else "a SQLite MLflow store"
    optuna = "PostgreSQL" if storage and storage.startswith("postgresql") else "SQLite"
    print(f"{trials} trials, minimal budget, {optuna} Optuna storage, MLflow on {where}")
    print("\n".join(line for line in done.stdout.splitlines() if line.startswith(("per", "  "))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20, help="trials in the study (default 20)")
    parser.add_argument(
        "--parallel", action="store_true", help="trials per minute with 1 and 2 workers"
    )
    parser.add_argument(
        "--components", action="store_true", help="a trial's fixed cost, part by part"
    )
    parser.add_argument("--tracking", default=None, help="with --components: an MLflow URI")
    parser.add_argument(
        "--storage", default=None, help="with --components: an Optuna storage URL (PostgreSQL)"
    )
    args = parser.parse_args()
    if args.components:
        components(args.trials, args.tracking, args.storage)
        return
    if args.parallel:
        parallel(args.trials)
        return
    with tempfile.TemporaryDirectory() as tmp:
        where = Path(tmp)
        study_s, results = run_study(where, args.trials)
        direct_s = run_direct(where)
    n = args.trials
    timings = results["timings"]
    first = [t["ask_s"] + t["tell_s"] for t in timings[:10]]
    last = [t["ask_s"] + t["tell_s"] for t in timings[-10:]]
    print(f"{n} trials, minimal budget, SQLite storage, one process each")
    print(f"(s) study, whole command           {study_s:8.1f} s   {study_s / n:6.2f} s/trial")
    print(f"(d) the same train() calls, direct  {direct_s:8.1f} s   {direct_s / n:6.2f} s/trial")
    print(f"overhead per trial ((s) - (d)) / N  {(study_s - direct_s) / n:8.2f} s   (goal: < 1 s)")
    print(f"(s)/(d)                             {study_s / direct_s:8.2f}")
    print(
        f"sampler + storage (ask + tell): first 10 trials median {statistics.median(first):.3f} s,"
        f" last 10 median {statistics.median(last):.3f} s, ratio "
        f"{statistics.median(last) / statistics.median(first):.2f} (goal at 200 vs 20: <= 2)"
    )


if __name__ == "__main__":
    main()
