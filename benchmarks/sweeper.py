"""The study sweeper's overhead: a study of N trials against the same N train() calls;
and trials per minute with 1 and 2 worker processes.

    .venv/bin/python benchmarks/sweeper.py                 # 20 trials
    .venv/bin/python benchmarks/sweeper.py --trials 200    # sampler + storage at trial 200
    .venv/bin/python benchmarks/sweeper.py --parallel      # n_jobs=1 against n_jobs=2

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20, help="trials in the study (default 20)")
    parser.add_argument(
        "--parallel", action="store_true", help="trials per minute with 1 and 2 workers"
    )
    args = parser.parse_args()
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
