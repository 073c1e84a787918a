"""How often a study's answer is right: the verdict's error rates at each budget of the
question library (sweeps/), measured on simulated studies with a known truth.

    .venv/bin/python benchmarks/calibration.py

For each study file: the settings of its first scientific parameter (its choices, or the
bins a numeric one makes), the trials per setting its n_trials gives, its seeds; then,
on cnnstudy.study.verdict's simulated studies (400 each way), how often a setting is
called worse when every setting is equal (false findings; the goal: at most 5%), and how
often a setting worse by 3 seed standard deviations is found (power; the goal: at least
80%); and the budget that reaches that power. Baseline, in the same run: the same rates
for a plain comparison of best values without the test (any difference called a
finding), which is what reading an isolation plot by eye does. Last, the false findings
when one setting is far worse and the others are equal. Nothing is asserted.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import yaml

from cnnstudy.study import verdict
from cnnstudy.study.analysis import _bins

REPO = Path(__file__).resolve().parents[1]


def settings_of(sweep: dict) -> tuple[str, int, int, int]:
    node = sweep["hydra"]["sweeper"]
    key = node["scientific"][0]
    trials, seeds = int(node["n_trials"]), int(node.get("seeds", 1))
    given = str(node["params"][key])
    if given.startswith("choice("):
        count = len(given.removeprefix("choice(").split(")")[0].split(","))
    else:
        count = _bins(trials, seeds)
    return key, count, trials // count, seeds


def by_eye(settings: int, per_setting: int, seeds: int, studies: int = 400) -> float:
    """Baseline: 'the best setting beats the others' whenever its best value is higher;
    how often a setting is called worse when all are equal (always, unless tied)."""
    rng = np.random.default_rng(7)
    called = 0
    for _ in range(studies):
        groups = verdict._simulated_study(rng, settings, per_setting, seeds, None)
        bests = [max(g) for g in groups]
        called += len(set(bests)) > 1
    return called / studies


def partial_null(settings: int, per_setting: int, seeds: int, studies: int = 300) -> float:
    """How often a setting equal to the best is called worse when another setting is far
    worse (10 s.d.): the case `verdict.rates` does not simulate."""
    rng = np.random.default_rng(5)
    labels = [str(i) for i in range(settings)]
    called = 0
    for k in range(studies):
        groups = verdict._simulated_study(rng, settings, per_setting, seeds, None)
        groups[-1] = [v - 10.0 for v in groups[-1]]
        result = verdict.compare(groups, labels, True, seed=k, permutations=300, intervals=False)
        called += any(d.worse for i, d in result.differences.items() if i != settings - 1)
    return called / studies


def main() -> None:
    print(
        f"{'study':<16} {'parameter':<22} {'settings':>8} {'per set':>7} {'seeds':>5} "
        f"{'false':>6} {'power':>6} {'by eye':>6} {'needed':>14} {'s':>5}"
    )
    for path in sorted((REPO / "sweeps").glob("*.yaml")):
        sweep = yaml.safe_load(path.read_text())
        key, count, per, seeds = settings_of(sweep)
        started = time.perf_counter()
        false, power = verdict.rates(count, per, seeds)
        needed = verdict.budget(count, seeds)
        seconds = time.perf_counter() - started
        need = "-" if needed is None else f"{needed}/set ({needed * count})"
        print(
            f"{path.stem:<16} {key:<22} {count:>8} {per:>7} {seeds:>5} {100 * false:>5.1f}% "
            f"{100 * power:>5.0f}% {100 * by_eye(count, per, seeds):>5.0f}% {need:>14} "
            f"{seconds:>5.1f}"
        )
    print(
        f"false: a setting called worse when all are equal (goal <= {100 * verdict.ALPHA:.0f}%); "
        f"power: a setting {verdict.EFFECT:g} seed s.d. worse found (goal >= "
        f"{100 * verdict.POWER:.0f}%); by eye: false findings of reading best values alone; "
        "needed: trials per setting (and in all) that reach the power goal"
    )
    print(
        "one setting 10 s.d. worse, the others equal (3 settings x 7 trials, 1 seed, 300 "
        f"studies): an equal one called worse {100 * partial_null(3, 7, 1):.1f}% of the time"
    )


if __name__ == "__main__":
    main()
