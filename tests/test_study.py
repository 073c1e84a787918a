"""Optuna studies from `cnnstudy-train -m`: the real command, tiny budgets on the digits."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import mlflow
import optuna
import pytest
from optuna.trial import TrialState

from .conftest import BIN, run_cli, start_cli

pytestmark = pytest.mark.slow

TINY = (
    "trainer=smoke",
    "logger.log_model=false",
    "logger.log_images=false",
    "trainer.num_threads=1",
    "hydra.sweeper.report=false",  # reports are tested on their own (test_report.py)
)


def study(where: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`cnnstudy-train -m ARGS` on the tiny budget (TINY, unless ARGS set the same key)."""
    given = {a.split("=", 1)[0] for a in args}
    return run_cli(
        "cnnstudy-train",
        "-m",
        *args,
        *(t for t in TINY if t.split("=", 1)[0] not in given),
        f"hydra.sweeper.storage=sqlite:///{where}/optuna.db",
        f"logger.artifact_location={where}/a",
        cwd=where,
        env={"MLFLOW_TRACKING_URI": f"sqlite:///{where}/mlflow.db", **(env or {})},
    )


def reproduce(where: Path, run_id: str) -> subprocess.CompletedProcess:
    """`cnnstudy-reproduce RUN_ID` against the study's MLflow store under `where`."""
    return run_cli(
        "cnnstudy-reproduce",
        run_id,
        "--no-progress",
        cwd=where,
        env={"MLFLOW_TRACKING_URI": f"sqlite:///{where}/mlflow.db"},
    )


def study_command(where: Path, *args: str) -> tuple[list[str], dict[str, str]]:
    """(argv, env) of `cnnstudy-train -m sweep=hidden_units` on the tiny budget, in its own
    stores under `where`, for tests that start it in the background."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{where}/mlflow.db"
    argv = [
        str(BIN / "cnnstudy-train"),
        "-m",
        "sweep=hidden_units",
        *TINY,
        *args,
        f"hydra.sweeper.storage=sqlite:///{where}/optuna.db",
        f"logger.artifact_location={where}/a",
    ]
    return argv, env


def trials_of(where: Path, name: str) -> list:
    """The study's trials, read under the storage's lock: a reader opening a new SQLite file
    while the study creates its tables would create them too (and one would crash)."""
    from cnnstudy.locks import store_lock

    url = f"sqlite:///{where}/optuna.db"
    with store_lock(url):
        loaded = optuna.load_study(study_name=name, storage=url)
        return loaded.get_trials(deepcopy=False)


def runs_of(where: Path) -> list:
    client = mlflow.MlflowClient(f"sqlite:///{where}/mlflow.db")
    experiment = client.get_experiment_by_name("cnnstudy")
    return client.search_runs([experiment.experiment_id], max_results=1000)


def finished(trials: list) -> list:
    """Complete or pruned trials that count towards n_trials: not rejected architectures."""
    done = (TrialState.COMPLETE, TrialState.PRUNED)
    return [t for t in trials if t.state in done and "rejected" not in t.user_attrs]


def test_a_study_runs_n_trials_as_child_runs_of_one_parent_and_resumes(tmp_path):
    first = study(tmp_path, "sweep=hidden_units", "hydra.sweeper.n_trials=3")
    assert first.returncode == 0, first.stderr[-3000:]
    trials = trials_of(tmp_path, "hidden_units")
    assert len(finished(trials)) == 3
    assert trials[0].params == {"model.hidden_units": 200, "optimizer.lr": 0.01}  # enqueued
    runs = runs_of(tmp_path)
    (parent,) = [r for r in runs if r.data.tags.get("cnnstudy.run_kind") == "study"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 3 and len(runs) == 4
    assert sorted(r.data.tags["cnnstudy.trial"] for r in children) == ["0", "1", "2"]
    by_trial = {int(r.data.tags["cnnstudy.trial"]): r for r in children}
    for trial in trials:  # the objective is the child run's validation accuracy
        run = by_trial[trial.number]
        assert trial.value == run.data.metrics["val/acc"]
        assert trial.user_attrs["mlflow_run_id"] == run.info.run_id
        assert run.info.run_name.startswith(f"trial {trial.number}: hidden_units=")
        assert run.info.status == "FINISHED" and run.data.tags["cnnstudy.trial_state"] == "COMPLETE"
        lr = run.info.run_name.rsplit("lr=", 1)[1]  # 4 significant digits; exact in params
        assert len(lr.replace("0.", "").lstrip("0")) <= 4, run.info.run_name
        assert float(run.data.params["optimizer.lr"]) == trial.params["optimizer.lr"]
    # pictures (off in sweeps, for speed) for each trial that was the best so far
    running, expected = None, set()
    for trial in sorted(trials, key=lambda t: t.number):
        if running is None or trial.value > running:
            running = trial.value
            expected.add(trial.number)
    pictured = {t for t, run in by_trial.items() if run.data.tags.get("cnnstudy.pictures")}
    assert pictured == expected and 0 in pictured
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    shown = {f.path for f in client.list_artifacts(by_trial[0].info.run_id, "pictures")}
    assert "pictures/filters_conv1.png" in shown
    assert parent.info.status == "FINISHED"
    assert parent.data.params["study.sampler"] == "TPESampler"
    best = max(trials, key=lambda t: t.value)
    assert json.loads(parent.data.tags["best.params"]) == best.params  # JSON, not a repr
    assert "**how many hidden units" in parent.data.tags["mlflow.note.content"]  # its landing page
    link = (
        "the study's trials: http://127.0.0.1:5000/#/experiments/"
        f"{parent.info.experiment_id}/runs?searchFilter="
    )
    assert link in first.stdout and "orderByKey=metrics.%60val%2Facc%60&orderByAsc=false" in (
        first.stdout
    )
    assert "best: trial" in first.stdout and "reproduce: cnnstudy-train" in first.stdout
    assert first.stdout.count(" COMPLETE ") == 3
    # the terminal: a header, a line per trial (k/N, value, best, time, ETA), the summary
    printed = (first.stdout + first.stderr).splitlines()
    assert len(printed) <= 1 + 3 + 5, "\n".join(printed)
    assert [line.split()[2] for line in printed if line.startswith("trial ")] == [
        "1/3",
        "2/3",
        "3/3",
    ]
    assert "ETA" in printed[1] and "val/acc 0." in printed[1]
    for noise in ("Launching", "Trainer", "MLflow database tables", "categorical units"):
        assert noise not in first.stdout + first.stderr, noise
    (results,) = tmp_path.glob("multirun/*/*/results.yaml")
    assert "best_mlflow_run_id" in results.read_text()

    again = study(tmp_path, "sweep=hidden_units", "hydra.sweeper.n_trials=5")
    assert again.returncode == 0, again.stderr[-3000:]
    trials = trials_of(tmp_path, "hidden_units")
    assert len(finished(trials)) == 5 and len(trials) == 5  # only the 2 missing ran
    params = [tuple(sorted(t.params.items())) for t in trials]
    assert len(set(params)) == 5  # the rebuilt seeded sampler did not repeat itself
    runs = runs_of(tmp_path)
    assert len([r for r in runs if r.data.tags.get("cnnstudy.run_kind") == "study"]) == 1
    assert len(runs) == 6

    same = study(tmp_path, "sweep=hidden_units", "hydra.sweeper.n_trials=5")
    assert same.returncode == 0 and len(trials_of(tmp_path, "hidden_units")) == 5


def test_the_command_line_space_overrides_the_file_and_a_changed_space_is_refused(tmp_path):
    done = study(
        tmp_path,
        "sweep=hidden_units",
        "hydra.sweeper.n_trials=3",
        "hydra.sweeper.enqueue=[]",
        "hydra.sweeper.study_name=narrow",
        "model.hidden_units=choice(32,64)",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    trials = trials_of(tmp_path, "narrow")
    assert {t.params["model.hidden_units"] for t in trials} <= {32, 64}
    assert all("optimizer.lr" in t.params for t in trials)  # the file's other key stays

    mixed = study(
        tmp_path,
        "sweep=hidden_units",
        "hydra.sweeper.study_name=narrow",
        "model.hidden_units=choice(16,32)",
    )
    assert mixed.returncode == 2
    assert "was created with the search space" in mixed.stderr
    assert "Traceback" not in mixed.stderr


SWEEP_HEADER = "# @package _global_\ndefaults:\n  - override /hydra/sweeper: cnnstudy\n"


def _write_sweep(tmp_path: Path, name: str, text: str) -> Path:
    """my_conf/sweep/NAME.yaml: the header every sweep file of one's own starts with, then
    `text`."""
    folder = tmp_path / "my_conf" / "sweep"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.yaml").write_text(SWEEP_HEADER + text)
    return tmp_path / "my_conf"


def study_from_file(tmp_path: Path, name: str, text: str) -> subprocess.CompletedProcess:
    """The study in my_conf/sweep/NAME.yaml (the header, then `text`), finished."""
    conf = _write_sweep(tmp_path, name, text)
    done = study(tmp_path, "--config-dir", str(conf), f"sweep={name}")
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_an_architecture_that_cannot_exist_is_rejected_fast_and_the_study_goes_on(tmp_path):
    done = study_from_file(
        tmp_path,
        "shapes",
        "hydra:\n  sweeper:\n    n_trials: 2\n"
        "    sampler: {_target_: optuna.samplers.RandomSampler, seed: 1}\n"
        "    enqueue: [{model.receptive_field: 40}]\n"
        "    params:\n      model.receptive_field: choice(3, 5, 40)\n",
    )
    trials = trials_of(tmp_path, "shapes")
    rejected = [t for t in trials if "rejected" in t.user_attrs]
    assert rejected and all(t.params["model.receptive_field"] == 40 for t in rejected)
    reason = rejected[0].user_attrs["rejected"]
    assert reason.startswith("rejected before training") and "floor((32 - 40" in reason
    # told to the sampler as a finished trial that violates its constraint: samplers ignore
    # failed trials, and TPE ranks an infeasible one below every feasible one
    assert rejected[0].state == TrialState.PRUNED
    assert rejected[0].constraints == {"shape_check": 1.0}
    assert "REJECTED" in done.stdout
    assert (rejected[0].datetime_complete - rejected[0].datetime_start).total_seconds() < 1.0
    assert len(finished(trials)) == 2
    assert len(runs_of(tmp_path)) == 3  # the parent and two trained trials, nothing for 40


def test_a_hydra_optuna_sweeper_file_runs_with_only_the_sweeper_changed(tmp_path):
    conf = _write_sweep(
        tmp_path,
        "legacy",
        # hydra-optuna-sweeper's example, with `override hydra/sweeper: cnnstudy`
        "  - override /hydra/sweeper/sampler: tpe\n"
        "hydra:\n  sweeper:\n"
        "    sampler:\n      seed: 123\n"
        "    direction: maximize\n    study_name: legacy\n    storage: null\n"
        "    n_trials: 2\n    n_jobs: 1\n    max_failure_rate: 0.0\n"
        "    params:\n      model.hidden_units: range(16, 64, step=16)\n"
        "      model.activation: choice(relu, tanh)\n",
    )
    done = run_cli(
        "cnnstudy-train",
        "-m",
        "--config-dir",
        str(conf),
        "sweep=legacy",
        *TINY,
        f"logger.artifact_location={tmp_path}/a",
        cwd=tmp_path,
        env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    trials = trials_of(tmp_path, "legacy")  # storage null: the default, ./optuna.db
    assert len(finished(trials)) == 2
    assert all(t.params["model.hidden_units"] in (16, 32, 48) for t in trials)  # 64 excluded
    (parent,) = [r for r in runs_of(tmp_path) if r.data.tags.get("cnnstudy.run_kind") == "study"]
    assert parent.data.params["study.sampler"] == "TPESampler"
    assert '"seed": 123' in parent.data.params["study.sampler_settings"]


def study_names(where: Path) -> list[str]:
    from cnnstudy.locks import store_lock

    url = f"sqlite:///{where}/optuna.db"
    with store_lock(url):
        return optuna.get_all_study_names(url)


def test_a_plain_comma_multirun_is_a_grid_study_that_resumes_and_retries(tmp_path):
    # each job of this command finds no tracking store; the study's name is its overrides
    nowhere = "+hydra.job.env_set.MLFLOW_TRACKING_URI=sqlite:////nonexistent/m.db"
    failing = study(tmp_path, "model.receptive_field=3,5", nowhere)
    assert failing.returncode == 2
    assert "2 of 2 combinations did not finish: model.receptive_field=" in failing.stderr
    assert "folder /nonexistent does not exist" in failing.stderr
    assert "Traceback" not in failing.stderr
    (name,) = study_names(tmp_path)  # named after the command: the same command resumes it
    assert name.startswith("multirun ")
    # the command, sorted; past 200 characters (a long tmp_path) cut, with a digest of it
    assert "model.receptive_field=3,5" in name or (len(name) == 195 and name[180:185] == " ... ")
    trials = trials_of(tmp_path, name)
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.FAIL]
    assert {t.params["model.receptive_field"] for t in trials} == {3, 5}

    done = study(tmp_path, "model.receptive_field=3,5")  # the failed combinations, again
    assert done.returncode == 0, done.stderr[-3000:]
    trials = trials_of(tmp_path, name)
    assert len(trials) == 4
    assert sorted(t.params["model.receptive_field"] for t in finished(trials)) == [3, 5]
    runs = runs_of(tmp_path)
    (parent,) = [r for r in runs if r.data.tags.get("cnnstudy.run_kind") == "study"]
    assert parent.data.params["study.sampler"] == "GridSampler"
    assert parent.data.params["study.n_trials"] == "2"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 2  # the failed trials stopped before their runs began
    assert "best: trial" in done.stdout

    again = study(tmp_path, "model.receptive_field=3,5")
    assert again.returncode == 0 and len(trials_of(tmp_path, name)) == 4  # nothing left


def test_several_objectives_give_a_pareto_front(tmp_path):
    import yaml

    done = study_from_file(
        tmp_path,
        "size",
        "hydra:\n  sweeper:\n    n_trials: 3\n    sampler: nsgaii\n"
        "    objective: [val/acc, model/params]\n    direction: [maximize, minimize]\n"
        "    enqueue: [{model.hidden_units: 8}, {model.hidden_units: 64}]\n"
        "    params:\n      model.hidden_units: choice(8, 64, 256)\n",
    )
    (results,) = tmp_path.glob("multirun/*/*/results.yaml")
    front = yaml.safe_load(results.read_text())["pareto_front"]
    from cnnstudy.locks import store_lock

    url = f"sqlite:///{tmp_path}/optuna.db"
    with store_lock(url):
        loaded = optuna.load_study(study_name="size", storage=url)
        best = sorted(t.number for t in loaded.best_trials)
    assert [entry["trial"] for entry in front] == best and best
    for entry in front:
        assert len(entry["values"]) == 2 and entry["reproduce"].startswith("cnnstudy-train ")
        assert entry["mlflow_run_id"]
    assert "Pareto front (val/acc, model/params):" in done.stdout
    (parent,) = [r for r in runs_of(tmp_path) if r.data.tags.get("cnnstudy.run_kind") == "study"]
    assert parent.data.params["study.sampler"] == "NSGAIISampler"
    assert parent.data.tags["pareto.trials"] == ",".join(map(str, best))


def test_each_setting_of_a_categorical_scientific_parameter_gets_its_turn(tmp_path):
    """balance (on by default): the settings of model.activation take turns, whatever TPE
    would have drawn; the learning rate (nuisance) is the sampler's, or the best trial's
    for a setting never tried near it (tests/test_samplers.py tests that rule alone)."""
    sweep = (
        "hydra:\n  sweeper:\n    n_trials: 7\n    scientific: [model.activation]\n"
        "    nuisance: [optimizer.lr]\n    params:\n"
        "      model.activation: choice(relu, tanh, none)\n"
        "      optimizer.lr: tag(log, interval(0.001, 0.03))\n"
    )
    study_from_file(tmp_path, "turns", sweep)
    trials = trials_of(tmp_path, "turns")
    drawn = [t.params["model.activation"] for t in trials]
    assert drawn == ["relu", "tanh", "none", "relu", "tanh", "none", "relu"]
    assert all(t.user_attrs.get("balanced") == "model.activation" for t in trials)
    for t in trials:  # given the best trial's learning rate, or the sampler's own
        if "nuisance_from" in t.user_attrs:
            source = trials[t.user_attrs["nuisance_from"]]
            assert t.params["optimizer.lr"] == source.params["optimizer.lr"]
            assert source.params["model.activation"] != t.params["model.activation"]
    assert len({t.params["optimizer.lr"] for t in trials}) >= 4


def test_a_trial_whose_heartbeat_stopped_on_another_machine_is_failed_and_retried(tmp_path):
    """A RUNNING trial from a host this one cannot see: its heartbeat, not its pid, says
    it is dead. Named sampler and pruner on the command line."""
    from cnnstudy.study.storage import HEARTBEAT, PROCESS, make_storage

    url = f"sqlite:///{tmp_path}/optuna.db"
    storage = make_storage(url)
    lost = optuna.create_study(study_name="hidden_units", storage=storage, direction="maximize")
    units = optuna.distributions.IntDistribution(8, 1024, log=True)
    trial = lost.ask({"model.hidden_units": units})
    number = storage.get_trial_id_from_study_id_trial_number(
        storage.get_study_id_from_name("hidden_units"), trial.number
    )
    storage.set_trial_system_attr(number, PROCESS, {"host": "elsewhere", "pid": "4242"})
    storage.set_trial_system_attr(number, HEARTBEAT, time.time() - 600)  # 10 minutes ago

    done = study(
        tmp_path,
        "sweep=hidden_units",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.enqueue=[]",
        "hydra.sweeper.retry_failed=1",
        "hydra.sweeper.sampler=qmc",
        "hydra.sweeper.pruner=median",
        "model.hidden_units=int(tag(log, interval(8, 1024)))",
        "optimizer.lr=0.01",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    trials = trials_of(tmp_path, "hidden_units")
    assert trials[0].state == TrialState.FAIL
    assert "no heartbeat for over" in trials[0].user_attrs["fail_reason"]
    assert "process 4242 on elsewhere" in trials[0].user_attrs["fail_reason"]
    retried = [t for t in trials if t.user_attrs.get("retry_of") == 0]
    assert len(retried) == 1 and retried[0].params == trials[0].params
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    assert len(finished(trials)) == 2
    (parent,) = [r for r in runs_of(tmp_path) if r.data.tags.get("cnnstudy.run_kind") == "study"]
    assert (parent.data.params["study.sampler"], parent.data.params["study.pruner"]) == (
        "QMCSampler",
        "MedianPruner",
    )


def test_a_pruner_prunes_a_trial_inside_training(tmp_path):
    study_from_file(
        tmp_path,
        "prune",
        "trainer: {max_epochs: 4, limit_train_batches: 3}\n"
        "hydra:\n  sweeper:\n    n_trials: 2\n"
        "    pruner: {_target_: optuna.pruners.MedianPruner, n_startup_trials: 1}\n"
        "    enqueue: [{optimizer.lr: 0.01}, {optimizer.lr: 30.0}]\n"
        "    params:\n      optimizer.lr: choice(0.01, 30.0)\n",
    )
    trials = trials_of(tmp_path, "prune")
    states = {t.params["optimizer.lr"]: t.state for t in trials}
    assert states == {0.01: TrialState.COMPLETE, 30.0: TrialState.PRUNED}
    (pruned_run,) = [r for r in runs_of(tmp_path) if r.data.tags.get("cnnstudy.trial") == "1"]
    assert pruned_run.info.status == "KILLED"
    assert pruned_run.data.tags["cnnstudy.trial_state"] == "PRUNED"
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    epochs = len(client.get_metric_history(pruned_run.info.run_id, "val/acc"))
    assert epochs < 4  # stopped before its last epoch
    # reported after every validation epoch, counted from 0 as the progress bar counts
    complete, pruned = trials
    assert sorted(complete.intermediate_values) == [0, 1, 2, 3]
    assert complete.intermediate_values[3] == complete.value
    last = max(pruned.intermediate_values)
    assert pruned.user_attrs["reason"].startswith(f"pruned at epoch {last} (after {last + 1} of 4")
    assert pruned_run.data.tags["cnnstudy.epochs_trained"] == str(last + 1) == str(epochs)
    again = reproduce(tmp_path, pruned_run.info.run_id)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "was pruned by its study" in again.stdout
    assert f"{epochs} of trainer.max_epochs=4 epochs" in again.stdout
    assert "MATCH" in again.stdout


def test_seeds_train_each_configuration_several_times_and_report_the_mean(tmp_path):
    done = study(
        tmp_path,
        "sweep=hidden_units",
        "hydra.sweeper.n_trials=1",
        "hydra.sweeper.seeds=2",
        "hydra.sweeper.study_name=seeded",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (trial,) = trials_of(tmp_path, "seeded")
    values = [v[0] for v in trial.user_attrs["seed_values"]]
    assert trial.value == pytest.approx(sum(values) / 2)
    runs = runs_of(tmp_path)
    seed_runs = [r for r in runs if r.data.tags.get("cnnstudy.run_kind") == "seed"]
    (trial_run,) = [r for r in runs if r.data.tags.get("cnnstudy.run_kind") == "trial"]
    assert len(seed_runs) == 2
    assert {r.data.tags["mlflow.parentRunId"] for r in seed_runs} == {trial_run.info.run_id}
    assert sorted(r.data.params["seed"] for r in seed_runs) == ["0", "1"]
    assert sorted(r.data.metrics["val/acc"] for r in seed_runs) == sorted(values)
    # the trial's run: ended as its trial, with its parameters, config, seed mean and spread
    assert not [r for r in runs if r.info.status == "RUNNING"]
    assert trial_run.info.status == "FINISHED"
    tags = trial_run.data.tags
    assert tags["cnnstudy.study"] == "seeded" and tags["cnnstudy.trial_state"] == "COMPLETE"
    assert tags["cnnstudy.pid"] and tags["cnnstudy.host"]  # what ends it if its process dies
    assert trial_run.data.params["model.hidden_units"] == str(trial.params["model.hidden_units"])
    assert trial_run.data.metrics["val/acc"] == pytest.approx(trial.value)
    assert trial_run.data.metrics["seed_std/val/acc"] == pytest.approx(
        trial.user_attrs["seed_std"][0]
    )
    assert trial.user_attrs["mlflow_run_id"] == trial_run.info.run_id
    (results,) = tmp_path.glob("multirun/*/*/results.yaml")
    assert f"best_mlflow_run_id: {trial_run.info.run_id}" in results.read_text()
    again = reproduce(tmp_path, trial_run.info.run_id)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "training seed(s) 0, 1 again" in again.stdout
    assert "MATCH: every metric of 2 seed run(s) agrees" in again.stdout


class LongStudy:
    """`cnnstudy-train -m sweep=hidden_units` whose first trial trains for minutes, started
    in the background; `resume()` runs the same command, with the usual tiny budget."""

    def __init__(self, where: Path, n_trials: int) -> None:
        self.where = where
        self.args, self.env = study_command(where, f"hydra.sweeper.n_trials={n_trials}")
        self.proc = start_cli(
            [*self.args, "trainer.max_epochs=500", "trainer.limit_train_batches=null"],
            cwd=where,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )

    def wait_for_training(self) -> None:
        """Until the first trial's MLflow run exists, then 2 s more: inside the fit."""
        from cnnstudy.run.store import serialized

        uri = f"sqlite:///{self.where}/mlflow.db"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.proc.stdout.read()[-3000:]
            if (self.where / "mlflow.db").exists():
                kinds = serialized(
                    uri, lambda: [r.data.tags.get("cnnstudy.run_kind") for r in runs_of(self.where)]
                )
                if "trial" in kinds:
                    time.sleep(2)
                    return
            time.sleep(0.5)
        raise AssertionError("no trial started training")

    def resume(self) -> subprocess.CompletedProcess:
        return run_cli(Path(self.args[0]).name, *self.args[1:], cwd=self.where, env=self.env)


def test_a_trial_killed_with_sigkill_is_marked_failed_when_the_study_resumes(tmp_path):
    long = LongStudy(tmp_path, n_trials=2)
    long.wait_for_training()
    os.killpg(long.proc.pid, signal.SIGKILL)
    long.proc.wait(timeout=30)
    assert [t.state for t in trials_of(tmp_path, "hidden_units")] == [TrialState.RUNNING]

    resumed = long.resume()
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    trials = trials_of(tmp_path, "hidden_units")
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    assert trials[0].state == TrialState.FAIL
    assert f"process {long.proc.pid}" in trials[0].user_attrs["fail_reason"]
    assert len(finished(trials)) == 2
    drawn = [t.params["optimizer.lr"] for t in finished(trials)]
    assert len(set(drawn)) == len(drawn)  # the resumed sampler did not repeat a draw


def test_diverged_trials_fail_in_optuna_and_mlflow_and_max_failures_stops_the_study(tmp_path):
    done = study(
        tmp_path,
        "sweep=hidden_units",
        "optimizer.lr=1e12",  # every trial: the loss becomes NaN
        "hydra.sweeper.max_failures=2",
        "hydra.sweeper.study_name=failing",
    )
    assert done.returncode == 2
    assert "hydra.sweeper.max_failures=2: 2 trials failed" in done.stderr
    assert "Traceback" not in done.stderr
    trials = trials_of(tmp_path, "failing")
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.FAIL]
    reason = trials[0].user_attrs["fail_reason"]
    assert reason.startswith("training diverged:") and "loss is nan" in reason
    runs = runs_of(tmp_path)
    statuses = sorted((r.data.tags.get("cnnstudy.run_kind"), r.info.status) for r in runs)
    assert statuses == [("study", "FAILED"), ("trial", "FAILED"), ("trial", "FAILED")]
    (parent,) = [r for r in runs if r.data.tags.get("cnnstudy.run_kind") == "study"]
    assert "max_failures=2" in parent.data.tags["cnnstudy.stopped_reason"]
    for run in runs:
        if run is not parent:
            assert run.data.tags["cnnstudy.trial_state"] == "FAIL"
            assert run.data.tags["cnnstudy.fail_reason"].startswith("training diverged")
    # a report of a study with no complete trial: said in its counts, no Optuna warnings
    written = run_cli(
        "cnnstudy-report",
        "failing",
        "--storage",
        f"sqlite:///{tmp_path}/optuna.db",
        "--no-mlflow",
        cwd=tmp_path,
    )
    assert written.returncode == 0, written.stderr[-3000:]
    assert "completed trials" not in written.stdout + written.stderr
    assert written.stdout.strip().splitlines() == ["report: reports/failing/index.html"]


def test_sigterm_during_a_study_marks_trial_and_runs_and_the_command_resumes(tmp_path):
    long = LongStudy(tmp_path, n_trials=1)
    long.wait_for_training()
    long.proc.send_signal(signal.SIGTERM)
    out = long.proc.communicate(timeout=60)[0]
    assert long.proc.returncode == 143, out[-3000:]
    (trial,) = trials_of(tmp_path, "hidden_units")
    assert trial.state == TrialState.FAIL and "SIGTERM" in trial.user_attrs["fail_reason"]
    statuses = {r.data.tags.get("cnnstudy.run_kind"): r.info.status for r in runs_of(tmp_path)}
    assert statuses == {"study": "KILLED", "trial": "KILLED"}

    resumed = long.resume()
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert len(finished(trials_of(tmp_path, "hidden_units"))) == 1
    parents = [r for r in runs_of(tmp_path) if r.data.tags.get("cnnstudy.run_kind") == "study"]
    assert [r.info.status for r in parents] == ["FINISHED"]  # the same parent, resumed
    assert "cnnstudy.killed_reason" not in parents[0].data.tags  # not a stale one
    assert parents[0].data.tags["cnnstudy.pid"] != str(long.proc.pid)  # held by the resume
    assert not [r for r in runs_of(tmp_path) if r.info.status == "RUNNING"]


def test_n_jobs_runs_trials_in_parallel_processes_with_a_share_of_the_cores(tmp_path):
    done = study(
        tmp_path,
        "sweep=hidden_units",
        "hydra.sweeper.n_trials=4",
        "hydra.sweeper.n_jobs=2",
        # seconds a trial: longer than the worker's start (its imports), or the driver,
        # whose imports are done, may run all four trials before the worker asks for one
        "trainer.max_epochs=60",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    trials = trials_of(tmp_path, "hidden_units")
    assert len(trials) == 4 and len(finished(trials)) == 4
    pids = {t.system_attrs["cnnstudy:process"]["pid"] for t in trials}
    assert len(pids) == 2  # two processes took trials
    runs = runs_of(tmp_path)
    assert len([r for r in runs if r.data.tags.get("cnnstudy.run_kind") == "study"]) == 1
    children = [r for r in runs if r.data.tags.get("cnnstudy.run_kind") == "trial"]
    threads = str(max(1, len(os.sched_getaffinity(0)) // 2))
    assert len(children) == 4 and {r.data.params["trainer.num_threads"] for r in children} == {
        threads
    }
    assert done.stdout.count("best: trial") == 1  # the first process reports the study


def test_two_commands_started_at_once_on_a_new_study_share_exactly_n_trials(tmp_path):
    args, env = study_command(tmp_path, "hydra.sweeper.n_trials=5")
    procs = [
        start_cli(
            args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for proc, out in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, out[-3000:]
    trials = trials_of(tmp_path, "hidden_units")
    assert sorted(t.number for t in trials) == [0, 1, 2, 3, 4]
    assert len(finished(trials)) == 5
    # each process's sampler seeded apart: no trial repeats another's draw
    assert len({t.params["optimizer.lr"] for t in trials}) == 5
    runs = runs_of(tmp_path)
    (parent,) = [r for r in runs if r.data.tags.get("cnnstudy.run_kind") == "study"]
    assert (
        len([r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]) == 5
    )


def test_what_would_fail_every_trial_is_an_error_before_anything_is_created(tmp_path):
    """One line, exit 2, in seconds, no study and no MLflow run: keys the config does not
    have, metrics no run logs, a pruner on several objectives, sampler arguments of the
    wrong type, counts out of range, a storage in a missing folder."""
    cases = {
        "model.nonexistent=choice(1,2)": "hydra.sweeper.params: model.nonexistent=1: Could not",
        "hydra.sweeper.objective=val/nope": "objective=val/nope: no run logs it; valid: val/acc",
        "hydra.sweeper.objective=[val/acc,model/params] hydra.sweeper.pruner=median": (
            "Optuna cannot prune a study of several objectives"
        ),
        "hydra.sweeper.sampler={name:tpe,n_startup_trials:abc}": "cannot draw a trial: TypeError",
        "hydra.sweeper.max_failures=0": "max_failures=0: must be at least 1",
        "hydra.sweeper.retry_failed=-1": "retry_failed=-1: must be 0 (no retry) or more",
        "hydra.sweeper.enqueue=[{model.foo:1}]": "enqueue: model.foo is not a parameter",
        "trainer.num_nodes=2": "trainer.num_nodes=2: a study's trial trains on one machine",
    }
    for args, said in cases.items():
        done = study(tmp_path, "sweep=hidden_units", *args.split())
        assert done.returncode == 2, (args, done.stderr[-2000:])
        assert said in done.stderr and "Traceback" not in done.stderr, (args, done.stderr)
        assert not (tmp_path / "optuna.db").exists() and not (tmp_path / "mlflow.db").exists()
    missing = run_cli(
        "cnnstudy-train",
        "-m",
        "sweep=hidden_units",
        f"hydra.sweeper.storage=sqlite:///{tmp_path}/missing/o.db",
        cwd=tmp_path,
        env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"},
    )
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert f"the folder {tmp_path}/missing does not exist" in missing.stderr
    assert not (tmp_path / "mlflow.db").exists()


def test_a_space_of_impossible_networks_stops_after_max_rejected_and_the_objective_stays(tmp_path):
    done = study(
        tmp_path,
        "sweep=hidden_units",
        "model.receptive_field=choice(40,50)",
        "hydra.sweeper.max_rejected=8",
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "max_rejected=8: the last 8 trials were all rejected by the shape check" in done.stderr
    assert "output size would be floor((32 - " in done.stderr  # the constraint that fails
    trials = trials_of(tmp_path, "hidden_units")
    assert len(trials) == 8 and all("rejected" in t.user_attrs for t in trials)
    (parent,) = runs_of(tmp_path)
    assert (
        parent.info.status == "FAILED"
        and "max_rejected" in parent.data.tags["cnnstudy.stopped_reason"]
    )
    # the same study with another objective would mix two metrics' values: refused
    other = study(
        tmp_path,
        "sweep=hidden_units",
        "model.receptive_field=choice(40,50)",
        "hydra.sweeper.objective=val/loss",
        "hydra.sweeper.direction=minimize",
    )
    assert other.returncode == 2
    assert "was created with the objective ['val/acc']" in other.stderr


def test_an_interval_on_the_command_line_is_a_sampled_study_not_a_grid(tmp_path):
    done = study(
        tmp_path,
        "model.hidden_units=int(interval(8, 64))",
        "hydra.sweeper.n_trials=2",
        "hydra.verbose=true",  # every library's lines, as Hydra's key means
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Launching 1 jobs locally" in done.stdout + done.stderr
    quiet = study(  # cnnstudy's messages are a logger's: Hydra's logging config silences them
        tmp_path,
        "model.hidden_units=int(interval(8, 64))",
        "hydra.sweeper.n_trials=2",
        "+hydra.hydra_logging.loggers.cnnstudy.level=WARNING",
        "+hydra.job_logging.loggers.cnnstudy.level=WARNING",
    )
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    assert "study multirun" not in quiet.stdout and "best: trial" not in quiet.stdout
    (parent,) = [r for r in runs_of(tmp_path) if r.data.tags["cnnstudy.run_kind"] == "study"]
    assert parent.data.params["study.sampler"] == "TPESampler"
    assert parent.data.params["study.n_trials"] == "2"


def _parallel(where: Path, n_trials: int) -> tuple[subprocess.Popen, list[str]]:
    """A 2-process study of trials of a few seconds each, started in the background."""
    args, env = study_command(
        where,
        "trainer.max_epochs=150",  # seconds a trial: a kill lands mid-training
        f"hydra.sweeper.n_trials={n_trials}",
        "hydra.sweeper.n_jobs=2",
    )
    proc = start_cli(
        args, cwd=where, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    return proc, args


def _worker_training(where: Path, driver: int) -> int:
    """The pid of the driver's worker, once the MLflow run of a trial of its is running."""
    from cnnstudy.run.store import serialized

    uri = f"sqlite:///{where}/mlflow.db"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if (where / "mlflow.db").exists():
            runs = serialized(uri, lambda: runs_of(where))
            for run in runs:
                pid = int(run.data.tags.get("cnnstudy.pid", 0))
                kind = run.data.tags.get("cnnstudy.run_kind")
                if kind == "trial" and run.info.status == "RUNNING" and pid != driver:
                    return pid
        time.sleep(0.3)
    raise AssertionError("no trial of the worker started")


def test_a_worker_killed_with_sigkill_fails_its_trial_and_the_driver_finishes_the_study(
    tmp_path,
):
    proc, _ = _parallel(tmp_path, n_trials=3)
    worker = _worker_training(tmp_path, proc.pid)
    os.kill(worker, signal.SIGKILL)
    out = proc.communicate(timeout=240)[0]
    assert proc.returncode == 0, out[-3000:]  # every trial finished: the study did
    assert f"worker {worker} was killed by SIGKILL; its trial was marked FAIL" in out, out[-3000:]
    trials = trials_of(tmp_path, "hidden_units")
    assert len(finished(trials)) == 3
    (dead,) = [t for t in trials if t.state == TrialState.FAIL]
    assert f"process {worker}" in dead.user_attrs["fail_reason"]
    runs = runs_of(tmp_path)
    assert not [r for r in runs if r.info.status == "RUNNING"]
    (lost,) = [r for r in runs if r.data.tags.get("cnnstudy.trial") == str(dead.number)]
    assert lost.info.status in ("FAILED", "KILLED")


def test_no_worker_outlives_its_driver_killed_with_sigkill(tmp_path):
    proc, _ = _parallel(tmp_path, n_trials=6)
    worker = _worker_training(tmp_path, proc.pid)
    proc.kill()
    proc.communicate(timeout=30)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and Path(f"/proc/{worker}").exists():
        status = Path(f"/proc/{worker}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if status == "Z":
            break  # it ended; init has not reaped it yet
        time.sleep(0.5)
    else:
        assert not Path(f"/proc/{worker}").exists(), "the worker went on without its driver"
    trials = trials_of(tmp_path, "hidden_units")
    # a trial the driver asked for just before the kill may not name its process yet
    owner = {t.number: (t.system_attrs.get("cnnstudy:process") or {}).get("pid") for t in trials}
    mine = [t for t in trials if owner[t.number] == str(worker)]
    assert mine and all(t.state != TrialState.RUNNING for t in mine)
    runs = runs_of(tmp_path)
    (parent,) = [r for r in runs if r.data.tags["cnnstudy.run_kind"] == "study"]
    assert parent.info.status == "KILLED"
    assert "driver" in parent.data.tags["cnnstudy.killed_reason"]
    worker_runs = [r for r in runs if r.data.tags.get("cnnstudy.pid") == str(worker)]
    assert worker_runs and all(r.info.status != "RUNNING" for r in worker_runs)


def test_a_trial_config_made_from_a_copy_equals_the_one_hydra_composes():
    """Trials' configs come from one composition per choice of config groups, copied and
    given each trial's values (study/trial.py): they must equal Hydra's own, the hydra
    node included, for values, group choices, dict values and additions."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    from cnnstudy.config.compose import CONFIG_DIR
    from cnnstudy.study.trial import _compose_once

    cases = [
        ["model.hidden_units=145", "optimizer.lr=0.0063"],
        ["model.hidden_units=17", "optimizer.lr=0.02"],
        ["model=lenet5", "optimizer.lr=0.01"],
        ["model.hidden_units=99", "model=mlp"],
        ["+extra.note=hello", "seed=3"],
        ["optimizer={lr: 0.5}", "data.batch_size=32"],
        ["model.hidden_units=145", "optimizer.lr=0.0063"],  # the same again
    ]
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        hydra_loader = GlobalHydra.instance().config_loader()
        master = hydra_loader.load_configuration(
            "train", ["sweep=hidden_units", "trainer=smoke"], run_mode=RunMode.MULTIRUN
        )
        ours = copy_loader = type(hydra_loader)(hydra_loader.config_search_path)
        _compose_once(copy_loader)
        fixed = ["sweep=hidden_units", "trainer=smoke"]
        for overrides in cases:
            theirs = hydra_loader.load_sweep_config(master, [*fixed, *overrides])
            for _ in range(2):  # the shape check's call, then the launcher's
                made = ours.load_sweep_config(master, [*fixed, *overrides])
                assert OmegaConf.to_container(made) == OmegaConf.to_container(theirs), overrides
                assert OmegaConf.is_struct(made) and not OmegaConf.is_readonly(made.hydra)
                assert made.hydra.overrides.task == [*fixed, *overrides]
        made.model.hidden_units = 1  # a job's config is its own: the next one is unchanged
        again = ours.load_sweep_config(master, [*fixed, "optimizer.lr=0.1"])
        assert again.model.hidden_units != 1
        with pytest.raises(Exception, match="nope"):
            ours.load_sweep_config(master, [*fixed, "model.nope=1"])
