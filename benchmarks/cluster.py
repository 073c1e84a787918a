"""Studies on the servers `make services` starts, against the same on SQLite files.

    make services && .venv/bin/python benchmarks/cluster.py
    .venv/bin/python benchmarks/cluster.py --trials 24 --workers 1 2 4
    .venv/bin/python benchmarks/cluster.py --only ask      # one part: rates, server, ask, start
    .venv/bin/python benchmarks/cluster.py --only start --baseline 1d96174   # on SQLite

1. rates: trials per minute with 1, 2 and 4 cooperating `cnnstudy-train -m` processes
   (started at once, one torch thread each) on one PostgreSQL study, against the same on
   one SQLite study; minimal trials (two batches), the MLflow store a SQLite file in both.
2. server: a trial's cost with the MLflow tracking server against a SQLite MLflow store,
   one process, N minimal trials, the Optuna storage a SQLite file in both.
3. ask: the study loop's own steps per trial (the storage lock, one read of the trials, a
   TPE ask over the hidden-units space, the tell), no training, at trial 20 against trial
   200, on PostgreSQL and on SQLite.
4. start: from a worker's process start to its first trial, step by step, and what its
   imports cost per library; with --baseline REV, against the same worker at REV.
5. requests: one MLflow request to the tracking server, on the client's kept-alive
   connection (as MLflow's client makes them) and on a fresh connection each time.
6. imports: what a worker imports before its first trial, each in a fresh process.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]
BUDGET = [
    "trainer=smoke",
    "logger.log_model=false",
    "logger.log_images=false",
    "trainer.num_threads=1",
    "hydra.sweeper.report=false",
]


def services() -> tuple[str, str]:
    from cnnstudy import services as s
    from cnnstudy.errors import ConfigError
    from cnnstudy.run.store import check_store

    try:
        check_store(s.optuna_url(), create=False)
    except ConfigError as err:
        sys.exit(f"{err}\nStart the services first: make services")
    if not s.healthy():
        sys.exit(f"no MLflow tracking server at {s.mlflow_url()}: make services")
    return s.optuna_url(), s.mlflow_url()


def study_processes(
    where: Path, storage: str, tracking: str, trials: int, workers: int, name: str
) -> tuple[float, list[float]]:
    """`workers` processes of one study started at once: the wall time until the last
    ends, and each process's start time (perf_counter)."""
    argv = [
        str(BIN / "cnnstudy-train"),
        "-m",
        "sweep=hidden_units",
        f"hydra.sweeper.study_name={name}",
        f"hydra.sweeper.n_trials={trials}",
        f"hydra.sweeper.storage={storage}",
        f"logger.experiment_name={name}",
        f"logger.artifact_location={where}/a",
        *BUDGET,
    ]
    env = {"MLFLOW_TRACKING_URI": tracking, "PATH": str(BIN), "OMP_NUM_THREADS": "1"}
    started = time.perf_counter()
    procs, starts = [], []
    for _ in range(workers):
        starts.append(time.time())
        procs.append(
            subprocess.Popen(
                argv,
                cwd=where,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    for proc in procs:
        out, _ = proc.communicate()
        if proc.returncode != 0:
            sys.exit(out[-3000:])
    return time.perf_counter() - started, starts


def _trials(storage: str, name: str) -> list:
    import optuna

    from cnnstudy.study.storage import make_storage

    return optuna.load_study(study_name=name, storage=make_storage(storage)).get_trials()


def _drop(storage: str, name: str) -> None:
    import optuna

    from cnnstudy.study.storage import make_storage

    optuna.delete_study(study_name=name, storage=make_storage(storage))


def rates(pg: str, trials: int, counts: list[int]) -> list[tuple[str, int, float]]:
    rows = []
    for label in ("PostgreSQL", "SQLite"):
        for workers in counts:
            with tempfile.TemporaryDirectory() as tmp:
                where = Path(tmp)
                storage = pg if label == "PostgreSQL" else f"sqlite:///{where}/optuna.db"
                name = f"bench-{uuid.uuid4().hex[:8]}"
                seconds, _ = study_processes(
                    where, storage, f"sqlite:///{where}/mlflow.db", trials, workers, name
                )
                done = [t for t in _trials(storage, name) if t.state.name == "COMPLETE"]
                assert len(done) == trials, f"{len(done)} trials, not {trials}"
                if label == "PostgreSQL":
                    _drop(storage, name)
            rows.append((label, workers, trials / seconds * 60))
            print(
                f"{label:<10} {workers} worker(s): {trials} trials in {seconds:5.1f} s, "
                f"{trials / seconds * 60:5.1f} trials/min",
                flush=True,
            )
    return rows


def server(mlflow_url: str, trials: int) -> None:
    seconds = {}
    for label in ("SQLite file", "tracking server"):
        with tempfile.TemporaryDirectory() as tmp:
            where = Path(tmp)
            tracking = mlflow_url if label == "tracking server" else f"sqlite:///{where}/mlflow.db"
            name = f"bench-{uuid.uuid4().hex[:8]}"
            # one trial first, so that both measure the same warm process
            wall, _ = study_processes(
                where, f"sqlite:///{where}/optuna.db", tracking, trials, 1, name
            )
            seconds[label] = wall
            print(
                f"MLflow on a {label:<15}: {trials} trials in {wall:5.1f} s, "
                f"{wall / trials:.3f} s/trial",
                flush=True,
            )
    extra = (seconds["tracking server"] - seconds["SQLite file"]) / trials
    print(
        f"the tracking server costs {extra * 1000:+.0f} ms a trial "
        f"(server / SQLite: {seconds['tracking server'] / seconds['SQLite file']:.2f}x)"
    )


def ask_tell(pg: str, upto: int = 210) -> None:
    import optuna
    from optuna.distributions import FloatDistribution, IntDistribution
    from optuna.trial import TrialState

    from cnnstudy.locks import store_lock
    from cnnstudy.study.standing import finished_count
    from cnnstudy.study.storage import open_study

    space = {
        "model.hidden_units": IntDistribution(16, 512, log=True),
        "optimizer.lr": FloatDistribution(1e-4, 1e-1, log=True),
    }
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    ratios = {}
    for label in ("PostgreSQL", "SQLite"):
        with tempfile.TemporaryDirectory() as tmp:
            url = pg if label == "PostgreSQL" else f"sqlite:///{tmp}/optuna.db"
            name = f"bench-{uuid.uuid4().hex[:8]}"
            study, _ = open_study(
                url, name, ["maximize"], {"search_space": "bench", "objective": ["val/acc"]}
            )
            study.sampler = optuna.samplers.TPESampler(seed=0)
            costs = []
            for _ in range(upto):
                started = time.perf_counter()
                with store_lock(url):  # as the study loop asks (loop.StudyRunner._ask)
                    trials = study.get_trials(deepcopy=False)
                    finished_count(study, trials)
                    sum(t.state == TrialState.RUNNING for t in trials)
                    trial = study.ask(fixed_distributions=space)
                value = 1 - abs(trial.params["model.hidden_units"] - 200) / 512
                study.tell(trial, value)
                costs.append(time.perf_counter() - started)
            if label == "PostgreSQL":
                _drop(url, name)
        at20 = statistics.median(costs[15:25])
        at200 = statistics.median(costs[195:205])
        ratios[label] = at200 / at20
        print(
            f"ask + tell on {label:<10}: {at20 * 1000:6.1f} ms at trial 20, "
            f"{at200 * 1000:6.1f} ms at trial 200: {at200 / at20:.2f}x (goal: at most 2x)"
        )


START = r"""
import functools, json, sys, time
out, t0 = sys.argv[1], float(sys.argv[2])
marks = {}

def mark(owner, name, label, at_exit=True):
    inner = getattr(owner, name)
    @functools.wraps(inner)
    def wrapper(*args, **kwargs):
        if not at_exit:
            marks.setdefault(label, time.time() - t0)
        try:
            return inner(*args, **kwargs)
        finally:
            if at_exit:
                marks.setdefault(label, time.time() - t0)
    setattr(owner, name, wrapper)

import cnnstudy.run.train as train  # what the console script imports first
import cnnstudy.study.loop as loop
import cnnstudy.study.trial as trial
marks["cnnstudy's command imported (Hydra, OmegaConf)"] = time.time() - t0
mark(loop.StudyRunner, "run", "the command's config composed", at_exit=False)
mark(loop.StudyRunner, "_check_before_the_first_trial", "the space checked")
mark(loop.StudyRunner, "_study", "the study opened (Optuna, its storage)")
mark(loop.StudyRunner, "_open", "the MLflow parent run opened (MLflow imported)")
mark(loop.StudyRunner, "_ask", "the first trial asked")
mark(train, "train", "its run starts (Lightning, torch imported)", at_exit=False)
mark(trial.TrialRunner, "finish", "the first trial told")
sys.argv = ["cnnstudy-train", *sys.argv[3:]]
try:
    train.main()
except SystemExit:
    pass
with open(out, "w") as f:
    json.dump(marks, f)
"""


def _import_costs(importtime: str) -> dict[str, float]:
    """Seconds of imports per library (each module's own time, `python -X importtime`)."""
    costs: dict[str, float] = {}
    for line in importtime.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        own, _, name = line[len("import time:") :].split("|")
        if not own.strip().isdigit():
            continue
        library = name.strip().split(".")[0]
        costs[library] = costs.get(library, 0.0) + int(own) / 1e6
    return costs


def worker_start(where: Path, storage: str, src: Path | None = None) -> dict[str, float]:
    """One worker on a new study of one minimal trial: when it asked and told its first
    trial, from its process's start; with this checkout's code, the timeline of its steps
    and what its imports cost, per library (the latter under -X importtime, its own run)."""
    name = f"bench-{uuid.uuid4().hex[:8]}"
    args = [
        "-m",
        "sweep=hidden_units",
        f"hydra.sweeper.study_name={name}",
        "hydra.sweeper.n_trials=1",
        f"hydra.sweeper.storage={storage}",
        f"logger.experiment_name={name}",
        f"logger.artifact_location={where}/a",
        *BUDGET,
    ]
    env = {
        "MLFLOW_TRACKING_URI": f"sqlite:///{where}/mlflow.db",
        "PATH": str(BIN),
        "OMP_NUM_THREADS": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }
    if src is not None:  # another checkout's code (the baseline): its console script
        env["PYTHONPATH"] = str(src)
        code = "import sys; from cnnstudy.run.train import cli; sys.argv[0] = 'x'; cli()"
        argv = [sys.executable, "-c", code, *args]
    else:
        argv = [sys.executable, "-c", START, str(where / "marks.json"), "", *args]
    started = time.time()
    if src is None:
        argv[4] = repr(started)
    done = subprocess.run(argv, cwd=where, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(done.stdout[-2000:] + done.stderr[-2000:])
    (trial,) = _trials(storage, name)
    seen = {
        "asked": trial.datetime_start.timestamp() - started,
        "told": trial.datetime_complete.timestamp() - started,
    }
    if src is None:
        seen.update(json.loads((where / "marks.json").read_text()))
        again = [  # a new study: the same worker's imports, under -X importtime
            f"hydra.sweeper.study_name={name}-imports"
            if a.startswith("hydra.sweeper.study_name=")
            else f"hydra.sweeper.storage=sqlite:///{where}/imports.db"
            if a.startswith("hydra.sweeper.storage=")
            else a
            for a in argv[1:]
        ]
        timed = subprocess.run(
            [sys.executable, "-X", "importtime", *again],
            cwd=where,
            env=env,
            capture_output=True,
            text=True,
        )
        seen["imports"] = _import_costs(timed.stderr)
    if storage.startswith("postgresql"):
        _drop(storage, name)
    return seen


def start(pg: str | None, baseline: str | None) -> None:
    """From a worker's process start to its first trial: a timeline of its steps, what its
    imports cost per library, and (--baseline REV) the same worker at another commit."""
    rows = []
    for label in ("SQLite", "PostgreSQL") if pg else ("SQLite",):
        with tempfile.TemporaryDirectory() as tmp:
            where = Path(tmp)
            storage = pg if label == "PostgreSQL" else f"sqlite:///{where}/optuna.db"
            seen = worker_start(where, storage)
        rows.append((label, seen))
        print(f"a worker on {label} (its process started at 0):")
        steps = {k: v for k, v in seen.items() if k not in ("asked", "told", "imports")}
        for step, at in sorted(steps.items(), key=lambda kv: kv[1]):
            print(f"  {at:5.2f} s  {step}")
        costs = sorted(seen["imports"].items(), key=lambda kv: -kv[1])
        total = sum(cost for _, cost in costs)
        shown = ", ".join(f"{lib} {cost:.2f}" for lib, cost in costs[:9])
        print(f"  imports: {total:.2f} s in all (-X importtime, its own run): {shown}", flush=True)
    if baseline is None:
        return
    with tempfile.TemporaryDirectory() as tmp:
        checkout = Path(tmp) / "baseline"
        subprocess.run(
            ["git", "worktree", "add", "--detach", str(checkout), baseline],
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
        try:
            now, then = [], []
            for _ in range(3):  # alternately, this checkout and the baseline
                for code, kept in ((None, now), (checkout / "src", then)):
                    with tempfile.TemporaryDirectory() as run_in:
                        where = Path(run_in)
                        kept.append(worker_start(where, f"sqlite:///{where}/optuna.db", code))
        finally:
            subprocess.run(
                ["git", "worktree", "remove", "--force", str(checkout)], cwd=ROOT, check=False
            )
    for key in ("asked", "told"):
        a = statistics.median(seen[key] for seen in now)
        b = statistics.median(seen[key] for seen in then)
        print(
            f"first trial {key}, SQLite, median of 3: {a:.2f} s now, {b:.2f} s at {baseline}: "
            f"{a / b:.2f}x (goal for the start to the first trial: 0.5x)"
        )


def requests_to(mlflow_url: str, n: int = 20) -> None:
    import mlflow
    import requests

    client = mlflow.MlflowClient(mlflow_url)
    name = f"bench-{uuid.uuid4().hex[:8]}"
    run = client.create_run(client.create_experiment(name))
    run_id = run.info.run_id

    def timed(label: str, call) -> float:
        call(0)  # the connection opened
        started = time.perf_counter()
        for k in range(n):
            call(k)
        seconds = (time.perf_counter() - started) / n
        print(f"{label:52s} {seconds * 1000:6.1f} ms", flush=True)
        return seconds

    kept = timed(
        "get_run, MLflow's client (kept-alive connection)", lambda k: client.get_run(run_id)
    )
    timed("set_tag, MLflow's client", lambda k: client.set_tag(run_id, f"k{k}", "v"))
    timed("log_metric, MLflow's client", lambda k: client.log_metric(run_id, "m", k, step=k))
    get = f"{mlflow_url}/api/2.0/mlflow/runs/get"
    fresh = timed(
        "get_run, a fresh connection each time",
        lambda k: requests.get(get, params={"run_id": run_id}, timeout=10),
    )
    client.set_terminated(run_id)
    print(f"kept-alive / fresh: {kept / fresh:.2f}x")


def imports() -> None:
    for modules in ("torch", "torch, lightning", "mlflow", "optuna", "hydra", "torchmetrics"):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", f"import {modules}"], check=True)
        print(f"import {modules:20s} {time.perf_counter() - started:5.2f} s (fresh process)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument(
        "--only", choices=("rates", "server", "ask", "start", "requests", "imports")
    )
    parser.add_argument(
        "--baseline", metavar="REV", help="with start: the same worker at this commit (SQLite)"
    )
    args = parser.parse_args()
    if args.only == "imports":
        imports()
        return
    if args.only == "start" and args.baseline:  # on SQLite: no services needed
        start(None, args.baseline)
        return
    pg, mlflow_url = services()
    if args.only in (None, "requests"):
        requests_to(mlflow_url)
    if args.only in (None, "imports"):
        imports()
    if args.only in (None, "start"):
        start(pg, args.baseline)
    if args.only in (None, "ask"):
        ask_tell(pg)
    if args.only in (None, "server"):
        server(mlflow_url, args.trials)
    if args.only in (None, "rates"):
        rows = rates(pg, args.trials, args.workers)
        base = {label: rate for label, workers, rate in rows if workers == 1}
        for label, workers, rate in rows:
            print(f"{label:<10} {workers} worker(s): {rate / base[label]:.2f}x one worker")
        for workers in args.workers:
            by = {label: rate for label, w, rate in rows if w == workers}
            print(f"{workers} worker(s): PostgreSQL / SQLite {by['PostgreSQL'] / by['SQLite']:.2f}")


if __name__ == "__main__":
    main()
