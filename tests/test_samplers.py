"""Samplers and pruners by name: each builds Optuna's own class and drives a study over a
cnnstudy search space, rejected architectures included (no training here: the study
commands are in test_study.py)."""

from __future__ import annotations

import math
import warnings

import optuna
import pytest
from optuna.trial import TrialState

from cnnstudy.errors import ConfigError
from cnnstudy.study import samplers
from cnnstudy.study import space as spaces
from cnnstudy.study.balance import Balance
from cnnstudy.study.settings import Settings
from cnnstudy.study.trial import tell

MIXED = [
    "model.receptive_field=choice(3, 5, 7, 40)",
    "model.hidden_units=int(interval(16, 256))",
    "optimizer.lr=tag(log, interval(0.001, 0.1))",
]
DISCRETE = ["model.receptive_field=3,5,40", "model.hidden_units=range(16, 80, step=32)"]


def _drive(sampler: object, space: dict, n: int, directions: list[str]) -> optuna.Study:
    """n trials: a receptive field of 40 fails the shape check (told as the sweeper does:
    pruned, constraint violated); the others get a value computed from their parameters."""
    study = optuna.create_study(directions=directions, sampler=sampler)
    for _ in range(n):
        trial = study.ask(fixed_distributions=space)
        field = trial.params["model.receptive_field"]
        if field == 40:
            trial.set_constraint("shape_check", 1.0)
            told = TrialState.PRUNED
        else:
            trial.set_constraint("shape_check", 0.0)
            units = trial.params["model.hidden_units"]
            told = [0.9 - abs(field - 5) * 0.01 - abs(math.log(units) - 4), float(units)]
            told = told[: len(directions)]
        if tell(study, trial, told):
            break  # the sampler covered its space
    return study


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("tpe", "TPESampler"),
        ("random", "RandomSampler"),
        ("gp", "GPSampler"),
        ("cmaes", "CmaEsSampler"),
        ("nsgaii", "NSGAIISampler"),
        ("nsga2", "NSGAIISampler"),
        ("nsgaiii", "NSGAIIISampler"),
        ("qmc", "QMCSampler"),
        ("grid", "GridSampler"),
        ("bruteforce", "BruteForceSampler"),
    ],
)
def test_every_named_sampler_is_optunas_own_and_drives_a_study(name, cls):
    discrete = name in ("grid", "bruteforce")
    space, _ = spaces.parse(DISCRETE if discrete else MIXED)
    spec = samplers.spec("sampler", name)
    sampler = samplers.build_sampler(
        spec, trials_before=0, grid=spaces.grid(space) if discrete else None
    )
    assert type(sampler).__name__ == cls
    assert isinstance(sampler, getattr(optuna.samplers, cls))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # experimental samplers, CMA-ES on categorical keys
        directions = ["maximize", "minimize"] if name.startswith("nsga") else ["maximize"]
        study = _drive(sampler, space, 6, directions)
    trials = study.get_trials()
    assert len(trials) == 6 and all(t.state.is_finished() for t in trials)
    for trial in trials:
        for key, value in trial.params.items():
            assert space[key]._contains(space[key].to_internal_repr(value))
    if name != "grid":
        assert spec["seed"] == 0  # seeded by default


def test_a_resumed_seeded_sampler_starts_from_a_new_seed():
    space, _ = spaces.parse(MIXED)
    spec = samplers.spec("sampler", {"name": "random", "seed": 3})

    def first(trials_before: int, attempt: int = 0) -> dict:
        sampler = samplers.build_sampler(spec, trials_before=trials_before)
        return optuna.create_study(sampler=sampler).ask(fixed_distributions=space).params

    assert first(0) == first(0)  # seeded
    assert first(0) != first(5)  # resumed after 5 trials: not the same draws again


def test_tpe_learns_to_avoid_rejected_architectures_only_when_told_they_finished():
    """Told FAIL, TPE never sees a rejected trial and keeps drawing the region; told
    PRUNED with the constraint violated (what the sweeper does), it draws it less."""
    space, _ = spaces.parse(
        [
            "model.receptive_field=choice(3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25)",
            "optimizer.lr=tag(log, interval(0.001, 0.1))",
        ]
    )
    rejected_late = {}
    for told in (TrialState.PRUNED, TrialState.FAIL):
        study = optuna.create_study(
            direction="maximize", sampler=optuna.samplers.TPESampler(seed=0)
        )
        count = 0
        for number in range(60):
            trial = study.ask(fixed_distributions=space)
            field = trial.params["model.receptive_field"]
            if field > 13:  # half the choices cannot exist
                trial.set_constraint("shape_check", 1.0)
                study.tell(trial, state=told)
                count += number >= 30
            else:
                trial.set_constraint("shape_check", 0.0)
                study.tell(trial, 0.9 - abs(field - 7) * 0.01)
        rejected_late[told] = count
    assert rejected_late[TrialState.PRUNED] < rejected_late[TrialState.FAIL]
    assert rejected_late[TrialState.PRUNED] < 15  # below half of trials 30-59


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("median", "MedianPruner"),
        ("percentile", "PercentilePruner"),
        ("successive_halving", "SuccessiveHalvingPruner"),
        ("successive-halving", "SuccessiveHalvingPruner"),
        ("hyperband", "HyperbandPruner"),
        ("wilcoxon", "WilcoxonPruner"),
        ("none", "NopPruner"),
    ],
)
def test_every_named_pruner_is_optunas_own(name, cls):
    pruner = samplers.build_pruner(samplers.spec("pruner", name))
    assert type(pruner).__name__ == cls
    assert type(samplers.build_pruner(None)).__name__ == "NopPruner"


def test_a_named_sampler_takes_its_arguments_and_a_wrong_name_says_what_is_valid():
    sampler = samplers.build_sampler(
        samplers.spec("sampler", {"name": "tpe", "n_startup_trials": 3, "seed": 7}),
        trials_before=0,
    )
    assert sampler._n_startup_trials == 3
    with pytest.raises(ConfigError, match=r"sampler=annealing: unknown sampler; valid names: tpe"):
        samplers.spec("sampler", "annealing")
    with pytest.raises(ConfigError, match=r"MedianPruner could not be built: TypeError"):
        samplers.build_pruner(samplers.spec("pruner", {"name": "median", "n_warmup": 1}))


def test_an_optunahub_sampler_loads_from_a_local_registry(tmp_path):
    package = tmp_path / "registry" / "samplers" / "half_random"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(
        "import optuna\n\n\nclass HalfRandomSampler(optuna.samplers.RandomSampler):\n"
        "    def __init__(self, seed=None, label='x'):\n"
        "        super().__init__(seed=seed)\n        self.label = label\n"
    )
    spec = samplers.spec(
        "sampler",
        {
            "hub": "samplers/half_random",
            "class": "HalfRandomSampler",
            "registry_root": str(tmp_path / "registry"),
            "seed": 1,
            "label": "from the hub",
        },
    )
    sampler = samplers.build_sampler(spec, trials_before=0)
    assert type(sampler).__name__ == "HalfRandomSampler" and sampler.label == "from the hub"
    space, _ = spaces.parse(MIXED)
    assert len(_drive(sampler, space, 3, ["maximize"]).trials) == 3
    with pytest.raises(ConfigError, match="has no such class"):
        samplers.build_sampler({**spec, "class": "Nope"}, trials_before=0)


def _balancing(trials: list[tuple[str, float, float]]) -> tuple[Balance, optuna.Study]:
    """model.pool balanced over a study holding these (pool, lr, value) trials."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution
    from optuna.trial import create_trial

    space = {
        "model.pool": CategoricalDistribution(["max", "avg", "none"]),
        "optimizer.lr": FloatDistribution(1e-3, 3e-2, log=True),
    }
    settings = Settings(scientific=["model.pool"], nuisance=["optimizer.lr"])
    study = optuna.create_study(direction="maximize")
    for pool, lr, value in trials:
        params = {"model.pool": pool, "optimizer.lr": lr}
        study.add_trial(create_trial(params=params, distributions=space, value=value))
    return Balance.of(settings, space, grid=False), study


def test_balance_gives_each_setting_its_turn_and_the_best_trials_nuisance_values():
    """The next trial goes to the setting with the fewest trials; a setting never tried
    near the best trial's learning rate gets that rate (the MNIST pooling study's
    confounding, docs/findings.md), once: then the sampler tunes it again."""
    balance, study = _balancing(
        [("max", 0.0013, 0.97), ("avg", 0.015, 0.99), ("none", 0.012, 0.98), ("avg", 0.002, 0.98)]
    )
    assert (balance.key, balance.choices) == ("model.pool", ["max", "avg", "none"])
    balance.queue_next(study)
    (waiting,) = study.get_trials(states=(TrialState.WAITING,))
    fixed = waiting.system_attrs["fixed_params"]
    assert fixed == {"model.pool": "max", "optimizer.lr": 0.015}
    assert waiting.user_attrs == {"balanced": "model.pool", "nuisance_from": 1}
    balance.queue_next(study)  # a trial is waiting: nothing more is queued
    assert len(study.get_trials(states=(TrialState.WAITING,))) == 1
    trial = study.ask()
    study.tell(trial, 0.985)
    balance.queue_next(study)  # max has had the best's rate: the next turn is none's
    (waiting,) = study.get_trials(states=(TrialState.WAITING,))
    assert waiting.system_attrs["fixed_params"] == {"model.pool": "none"}
    assert waiting.user_attrs == {"balanced": "model.pool"}


def test_balance_is_off_when_asked_for_several_objectives_or_no_categorical_scientific():
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    pools = {"model.pool": CategoricalDistribution(["max", "avg"])}
    off = Settings(scientific=["model.pool"], balance=False)
    assert Balance.of(off, pools, grid=False) is None
    assert Balance.of(Settings(scientific=["model.pool"]), pools, grid=True) is None
    several = Settings(scientific=["model.pool"], objective=["val/acc", "model/params"])
    assert Balance.of(several, pools, grid=False) is None
    rate = Settings(scientific=["optimizer.lr"])
    assert Balance.of(rate, {"optimizer.lr": FloatDistribution(1e-3, 1e-2)}, grid=False) is None
    assert Balance.of(Settings(scientific=["model.pool"]), pools, grid=False) is not None


def test_a_trial_failed_by_another_process_while_stalled_ends_cleanly(tmp_path, caplog):
    """Its heartbeat went stale, a live process marked it FAIL; when the stalled process
    comes back with its result, it says so and goes on: no traceback, the trial FAIL."""
    from cnnstudy.study.trial import Outcome, Tracking, TrialRunner

    storage = optuna.storages.InMemoryStorage()
    study = optuna.create_study(storage=storage, direction="maximize")
    trial = study.ask({"x": optuna.distributions.FloatDistribution(0.0, 1.0)})
    storage.set_trial_state_values(  # what another process's mark_dead_trials does
        storage.get_trial_id_from_study_id_trial_number(
            storage.get_study_id_from_name(study.study_name), trial.number
        ),
        state=TrialState.FAIL,
    )
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    runner = TrialRunner(Settings(), None, None, None, [], Tracking(uri, "0", "parent"))
    assert runner.finish(study, trial, Outcome("COMPLETE", [0.5])) is False
    assert study.trials[0].state == TrialState.FAIL
    assert not (tmp_path / "mlflow.db").exists()  # no run to end, no store made


def test_a_study_keeps_its_space_and_a_trial_that_never_beat_is_failed(tmp_path, monkeypatch):
    """A study stored before its objectives had names still refuses another space; a
    RUNNING trial with no heartbeat at all (its process died before the first beat)
    fails once it is older than the grace period, instead of being waited on forever."""
    from cnnstudy.errors import ConfigError as Refused
    from cnnstudy.study import storage

    url = f"sqlite:///{tmp_path}/optuna.db"
    attrs = {"search_space": "A", "objective": ["val/acc"], "seeds": 1}
    old = optuna.create_study(study_name="s", storage=url, direction="maximize")
    old.set_user_attr("cnnstudy.search_space", "A")  # as a study made before names were set
    with pytest.raises(Refused, match="created with the search space A"):
        storage.open_study(url, "s", ["maximize"], {**attrs, "search_space": "B"})
    study, _ = storage.open_study(url, "s", ["maximize"], attrs)
    assert study.metric_names == ["val/acc"]
    study.ask({"x": optuna.distributions.FloatDistribution(0.0, 1.0)})  # never claimed
    storage.mark_dead_trials(study, retry_failed=0)
    assert study.trials[0].state == TrialState.RUNNING  # young: its process may yet beat
    monkeypatch.setattr(storage, "GRACE_S", -1)
    storage.mark_dead_trials(study, retry_failed=0)
    (trial,) = study.get_trials()
    assert trial.state == TrialState.FAIL and "no heartbeat" in trial.user_attrs["fail_reason"]
