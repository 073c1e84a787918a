"""Studies beyond one process: many workers on one PostgreSQL study, the MLflow tracking
server, worker jobs through Hydra's submitit launcher (submitit_local), preemption.

Against the real servers `make services` starts on 127.0.0.1 (`make test` starts them).
CNNSTUDY_REQUIRE_SERVICES=1 (set by .ci/run): in CI they must be there, and these tests
fail instead of skipping."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import mlflow
import optuna
import pytest
from optuna.trial import TrialState

from .conftest import BIN, run_cli, start_cli
from .test_study import TINY  # the tiny training budget of every study test

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def services() -> dict[str, str]:
    """The URLs of the running services, or a skip (a failure in CI) naming make services."""
    from cnnstudy import services as s
    from cnnstudy.errors import ConfigError
    from cnnstudy.run.store import check_store

    try:
        check_store(s.optuna_url(), create=False)
        if not s.healthy():
            raise ConfigError(f"no MLflow tracking server answers at {s.mlflow_url()}")
        if s.db_password() is None:
            raise ConfigError(f"no database password in {s.password_file()}")
    except ConfigError as err:
        if os.environ.get("CNNSTUDY_REQUIRE_SERVICES") == "1":
            pytest.fail(f"CNNSTUDY_REQUIRE_SERVICES=1 but {err}", pytrace=False)
        pytest.skip(f"services not running ({err}); start them: make services")
    return {"storage": s.optuna_url(), "tracking": s.mlflow_url(), "password": s.db_password()}


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(OMP_NUM_THREADS="1", **extra)
    return env


def cluster_command(name: str, *args: str) -> list[str]:
    """`cnnstudy-train -m sweep=hidden_units` on PostgreSQL and the tracking server, in an
    experiment of its own."""
    return [
        str(BIN / "cnnstudy-train"),
        "-m",
        "sweep=hidden_units",
        "storage=postgres",
        "logger=server",
        f"hydra.sweeper.study_name={name}",
        f"logger.experiment_name={name}",
        *TINY,
        *args,
    ]


def _start(where: Path, argv: list[str], tag: str) -> subprocess.Popen:
    out = open(where / f"{tag}.out", "w")
    return start_cli(argv, cwd=where, env=_env(), stdout=out, stderr=subprocess.STDOUT, text=True)


def _output(where: Path, tag: str) -> str:
    return (where / f"{tag}.out").read_text()


def _study(services: dict[str, str], name: str) -> optuna.Study:
    """The study, read under the storage's lock: Optuna creates its tables on a fresh
    database when a storage is opened, and two processes doing so at once collide (seen:
    this test's reader against a worker opening the study, on a database just made)."""
    from cnnstudy.locks import store_lock
    from cnnstudy.study.storage import make_storage

    with store_lock(services["storage"]):
        return optuna.load_study(study_name=name, storage=make_storage(services["storage"]))


def _runs(services: dict[str, str], name: str) -> list:
    client = mlflow.MlflowClient(services["tracking"])
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        return []
    return client.search_runs([experiment.experiment_id], max_results=1000)


def _finished(trials: list) -> list:
    return [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]


def _name(what: str) -> str:
    return f"{what}-{uuid.uuid4().hex[:8]}"


def test_four_workers_at_once_share_one_study_and_one_killed_has_its_trial_retried(
    tmp_path, services
):
    """Four workers started at the same moment on one PostgreSQL study; one of them is
    killed with SIGKILL mid-trial: a live worker fails its trial and runs it again, and
    the study ends with exactly n_trials, distinct numbers, one parent run, nothing left
    RUNNING in Optuna or MLflow."""
    name = _name("four")
    argv = cluster_command(
        name, "hydra.sweeper.n_trials=6", "hydra.sweeper.retry_failed=1", "trainer.max_epochs=50"
    )
    workers = {k: _start(tmp_path, argv, f"w{k}") for k in range(4)}
    killed = None
    deadline = time.monotonic() + 180
    while killed is None and time.monotonic() < deadline:  # a trial is training
        time.sleep(0.5)
        try:
            study = _study(services, name)
        except KeyError:
            continue
        client = mlflow.MlflowClient(services["tracking"])
        training = {  # trials whose run has most of its 50 epochs still to go
            r.data.tags.get("cnnstudy.trial")
            for r in _runs(services, name)
            if r.data.tags.get("cnnstudy.run_kind") == "trial"
            and r.info.status == "RUNNING"
            and len(client.get_metric_history(r.info.run_id, "train/loss")) <= 15
        }
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            pid = int((trial.system_attrs.get("cnnstudy:process") or {}).get("pid", 0))
            victim = [k for k, w in workers.items() if w.pid == pid]
            if str(trial.number) in training and victim:
                dying = workers.pop(victim[0])
                dying.send_signal(signal.SIGKILL)
                dying.wait()  # reaped, as its shell would: its pid gone, not a zombie's
                killed = trial
                break
    assert killed is not None, [_output(tmp_path, f"w{k}")[-1000:] for k in range(4)]
    codes = {k: w.wait(timeout=400) for k, w in workers.items()}
    assert set(codes.values()) == {0}, [_output(tmp_path, f"w{k}")[-2000:] for k in codes]
    trials = _study(services, name).get_trials(deepcopy=False)
    states = [(t.number, t.state.name, sorted(t.user_attrs)) for t in trials]
    assert len(_finished(trials)) == 6 and len(trials) == 7, states  # and the killed one
    assert sorted(t.number for t in trials) == list(range(7))
    dead = [t for t in trials if t.number == killed.number][0]
    assert dead.state == TrialState.FAIL and "process" in dead.user_attrs["fail_reason"]
    retried = [t for t in trials if t.user_attrs.get("retry_of") == killed.number]
    assert len(retried) == 1 and retried[0].params == killed.params
    assert retried[0].state == TrialState.COMPLETE
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    runs = _runs(services, name)
    parents = [r for r in runs if r.data.tags.get("cnnstudy.run_kind") == "study"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert {r.info.status for r in runs} <= {"FINISHED", "FAILED", "KILLED"}, [
        (r.info.run_name, r.info.status) for r in runs
    ]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert {int(r.data.tags["cnnstudy.trial"]) for r in children} >= {
        t.number for t in _finished(trials)
    }
    # the workers shared the study: more than one process ran its trials
    assert len({t.system_attrs["cnnstudy:process"]["pid"] for t in trials}) > 1
    said = "".join(_output(tmp_path, f"w{k}") for k in codes)
    assert f"trial {killed.number}: marked FAIL" in said
    for k in codes:  # each worker tells the whole story at the end
        assert "best: trial" in _output(tmp_path, f"w{k}")


def test_submitit_local_workers_complete_the_study_and_a_preempted_one_is_requeued(
    tmp_path, services
):
    name = _name("jobs")
    argv = cluster_command(
        name,
        "cluster=local",  # submitit_local, 2 worker jobs: the preset as users run it
        "hydra.sweeper.n_trials=4",
        "trainer.max_epochs=30",
        f"hydra.sweep.dir={tmp_path}/sweep",
    )
    head = _start(tmp_path, argv, "head")
    deadline = time.monotonic() + 180
    preempted = None
    while time.monotonic() < deadline and preempted is None:
        time.sleep(0.5)
        try:
            study = _study(services, name)
        except KeyError:
            continue
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            process = trial.system_attrs.get("cnnstudy:process")
            started = trial.datetime_start
            if process and started and time.time() - started.timestamp() > 1.5:
                os.kill(int(process["pid"]), signal.SIGUSR2)  # SLURM's warning signal
                preempted = trial
                break
    assert preempted is not None, _output(tmp_path, "head")[-3000:]
    assert head.wait(timeout=400) == 0, _output(tmp_path, "head")[-3000:]
    trials = _study(services, name).get_trials(deepcopy=False)
    assert len(_finished(trials)) == 4
    stopped = [t for t in trials if t.number == preempted.number][0]
    assert stopped.state == TrialState.FAIL
    again = [t for t in trials if t.user_attrs.get("retry_of") == preempted.number]
    assert len(again) == 1 and again[0].user_attrs.get("preempted") is True
    assert again[0].params == preempted.params
    runs = _runs(services, name)
    assert {r.info.status for r in runs} <= {"FINISHED", "KILLED"}
    parents = [r for r in runs if r.data.tags.get("cnnstudy.run_kind") == "study"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    said = _output(tmp_path, "head")
    assert "2 worker job(s) submitted" in said and "best: trial" in said
    assert "(stopped by SIGUSR2)" in said
    logs = "".join(p.read_text() for p in (tmp_path / "sweep" / ".submitit").rglob("*_log.*"))
    assert "preempted" in logs  # submitit's own word: it requeued the job
    # the same command again only summarises: nothing is submitted
    again_head = run_cli("cnnstudy-train", *argv[1:], cwd=tmp_path, env=_env(), timeout=300)
    assert again_head.returncode == 0, again_head.stderr[-2000:]
    assert "submitted" not in again_head.stdout + again_head.stderr
    assert "best: trial" in again_head.stdout


def test_artifacts_go_to_the_servers_store_and_no_password_is_written_anywhere(tmp_path, services):
    from cnnstudy.services import state_dir

    name = _name("secret")
    done = run_cli(
        "cnnstudy-train",
        "storage=postgres",
        "logger=server",
        f"logger.experiment_name={name}",
        "trainer=smoke",
        "logger.log_images=false",
        cwd=tmp_path,
        env=_env(),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (run,) = _runs(services, name)
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/")
    stored = state_dir() / "mlartifacts" / run.info.experiment_id / run.info.run_id
    assert (stored / "artifacts" / "config.yaml").is_file()
    assert not (tmp_path / "mlartifacts").exists()  # nothing in the client's folder
    study = run_cli(
        "cnnstudy-train",
        *cluster_command(name, "hydra.sweeper.n_trials=1", "hydra.sweeper.report=true")[1:],
        cwd=tmp_path,
        env=_env(),
    )
    assert study.returncode == 0, study.stderr[-3000:]
    password = services["password"]
    seen = [done.stdout, done.stderr, study.stdout, study.stderr]
    seen += [p.read_text(errors="replace") for p in tmp_path.rglob("*") if p.is_file()]
    seen += [p.read_text(errors="replace") for p in stored.parent.rglob("*") if p.is_file()]
    for r in _runs(services, name):
        seen.append(json.dumps([r.data.params, r.data.tags, r.data.metrics]))
    loaded = _study(services, name)
    seen.append(json.dumps(loaded.user_attrs, default=str))
    seen.append((state_dir() / "mlflow-server.log").read_text(errors="replace"))
    assert not [text for text in seen if password in text]
    assert (tmp_path / "multirun").exists() and list(tmp_path.rglob(".hydra/config.yaml"))


@pytest.mark.parametrize(
    "given, said",
    [
        (["hydra.sweeper.storage=sqlite:///optuna.db"], ["SQLite", "storage=postgres"]),
        (
            [
                "hydra.sweeper.storage=postgresql+psycopg://u@127.0.0.1:1/x",
                "logger.tracking_uri=sqlite:///m.db",
            ],
            ["logger.tracking_uri=sqlite:///m.db", "logger=server"],
        ),
        (
            ["storage=postgres", "logger=server", "hydra.launcher.tasks_per_node=2"],
            ["hydra.launcher.tasks_per_node=2", "Valid: 1"],
        ),
        (["storage=postgres", "logger=server"], ["sbatch", "submitit_local"]),
    ],
)
def test_what_cannot_work_on_slurm_is_said_before_anything_is_created(tmp_path, given, said):
    done = run_cli(
        "cnnstudy-train",
        "-m",
        "sweep=hidden_units",
        "hydra/launcher=submitit_slurm",
        *given,
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin"},  # no sbatch here
        timeout=120,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert all(s in done.stderr for s in said), done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert not list(tmp_path.rglob("*.db")) and not list(tmp_path.rglob(".submitit"))


def test_a_sqlite_study_at_work_on_a_second_machine_is_refused(tmp_path):
    from optuna.distributions import IntDistribution

    from cnnstudy.study.storage import HEARTBEAT, PROCESS, _one_machine_only

    url = f"sqlite:///{tmp_path}/optuna.db"
    storage = optuna.storages.RDBStorage(url)  # what another machine's worker writes
    study = optuna.create_study(study_name="hidden_units", storage=storage, direction="maximize")
    trial = study.ask({"model.hidden_units": IntDistribution(16, 512)})
    tid = storage.get_trial_id_from_study_id_trial_number(
        storage.get_study_id_from_name("hidden_units"), trial.number
    )
    storage.set_trial_system_attr(tid, PROCESS, {"host": "another-machine", "pid": "1"})
    storage.set_trial_system_attr(tid, HEARTBEAT, time.time())
    done = run_cli(
        "cnnstudy-train",
        "-m",
        "sweep=hidden_units",
        *TINY,
        f"hydra.sweeper.storage={url}",
        cwd=tmp_path,
        env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"},
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "running on another-machine" in done.stderr and "storage=postgres" in done.stderr
    assert len(study.trials) == 1
    # the other machine gone quiet (its heartbeat stale): the study resumes here
    storage.set_trial_system_attr(tid, HEARTBEAT, time.time() - 3600)
    _one_machine_only(optuna.load_study(study_name="hidden_units", storage=url), url)


def test_a_connection_the_server_dropped_is_replaced_not_an_error(services):
    """pool_pre_ping: a pooled connection that died while idle (a firewall after hours,
    a server restart) is tested before use and replaced."""
    import sqlalchemy

    from cnnstudy.study.storage import make_storage

    name = _name("idle")
    storage = make_storage(services["storage"])
    optuna.create_study(study_name=name, storage=storage)
    with storage.engine.connect() as connection:  # the pool's one idle connection, below
        pid = connection.execute(sqlalchemy.text("SELECT pg_backend_pid()")).scalar()
    killer = sqlalchemy.create_engine(
        services["storage"], connect_args={"password": services["password"]}
    )
    with killer.connect() as connection:  # the same role may end its own sessions
        ended = connection.execute(
            sqlalchemy.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid}
        ).scalar()
    killer.dispose()
    assert ended
    time.sleep(0.5)
    study = optuna.load_study(study_name=name, storage=storage)  # through the pool again
    assert study.study_name == name


def test_make_services_twice_is_harmless(services):
    again = run_cli("python", "-m", "cnnstudy", "services", "start", cwd=Path.cwd(), env=_env())
    assert again.returncode == 0, again.stderr[-2000:]
    assert "already serving" in again.stdout
    status = run_cli("python", "-m", "cnnstudy", "services", "status", cwd=Path.cwd(), env=_env())
    assert status.returncode == 0 and "online" in status.stdout and "serving" in status.stdout
    assert services["password"] not in again.stdout + again.stderr + status.stdout


def test_workers_on_a_machine_with_gpus_take_one_each(monkeypatch):
    from cnnstudy.study import workers

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert workers.gpus() == ["2", "3"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert workers.gpus() == []
    four = ["0", "1", "2", "3"]
    assert workers.share_gpus(four, 3, 1) == ["0", "1", "2"]
    assert workers.share_gpus(["0", "1"], 3, 1) == ["0", "1", "0"]
    assert workers.share_gpus(four, 2, 2) == ["0,1", "2,3"]  # DDP trials: a block each
    assert workers.share_gpus(four, 3, 2) == [None, None, None]  # not enough: all visible
    assert workers.share_gpus([], 2, 1) == [None, None]


def test_the_cluster_presets_compose_without_the_services():
    from hydra import compose, initialize_config_dir

    from cnnstudy.config.compose import CONFIG_DIR

    seen = {}
    for preset in ("local", "slurm", "slurm_gpu"):
        with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
            cfg = compose("train", overrides=[f"cluster={preset}"], return_hydra_config=True)
        seen[preset] = cfg
        assert cfg.hydra.sweeper.storage.startswith("postgresql+psycopg://cnnstudy@")
        assert cfg.logger.tracking_uri.startswith("http://")
        assert ":" not in cfg.hydra.sweeper.storage.split("//", 1)[1].split("@")[0]  # no password
    assert seen["local"].hydra.launcher._target_.endswith("LocalLauncher")
    assert seen["slurm"].hydra.launcher._target_.endswith("SlurmLauncher")
    gpu = seen["slurm_gpu"]
    assert gpu.trainer.accelerator == "gpu" and gpu.hydra.launcher.gpus_per_node == 1
    assert gpu.hydra.launcher.signal_delay_s == 120
