"""Is one setting of the scientific parameter better than another? One test, calibrated.

The comparison is the tuning playbook's isolation: the best trial at each setting (its
nuisance parameters tuned). Whether two settings' best values differ by more than chance
is a permutation test: the trials' setting labels are shuffled (`PERMUTATIONS` times)
and the difference of the best values recomputed; under "the setting does not matter"
every shuffle is as likely as the one observed. It needs no assumption about seed noise
or the nuisance parameters' effect, and holds with one seed per trial.

- `compare` first tests all settings at once (the range of their best values); only
  when that rejects at `ALPHA` is any setting called worse than the best one, each by
  its own test, Holm-corrected. So "X is worse" is said, when no setting differs, at
  most ALPHA of the time, whatever the number of settings.
- Each difference from the best setting gets a 95% interval by inverting the same test
  (the shifts of the setting's values that the test would not reject): unlike a
  bootstrap of a maximum, it can fall on either side of the observed difference.
- `rates` measures the verdict itself on simulated studies with a known truth (settings
  equal, or one worse by `EFFECT` seed standard deviations), at a study's budget;
  `budget` finds the trials per setting that reach `POWER`. A study whose budget cannot
  find such a difference `POWER` of the time is too small to answer.

Only numpy and the standard library: no Optuna, no torch.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

ALPHA = 0.05
PERMUTATIONS = 2000
EFFECT = 3.0  # the difference a study should find, in seed standard deviations
POWER = 0.8  # how often it should find it
NUISANCE = 3.0  # simulated studies: an untuned nuisance parameter's worst cost, in s.d.
SIMULATED = 400  # simulated studies per measured rate
MOST_PER_SETTING = 40  # `budget` looks no further


@dataclass
class Difference:
    """One setting against the best one: how much worse, how sure."""

    label: str
    difference: float  # best setting's best value minus this one's (> 0: worse)
    interval: tuple[float, float]  # 95%, the inverted permutation test
    p: float  # Holm-adjusted p-value
    worse: bool  # a finding: rejected, and the test of all settings rejected


@dataclass
class Comparison:
    p_all: float  # the test of all settings at once
    top: int  # index of the best setting
    differences: dict[int, Difference]  # every other setting, by index


def _orient(values: np.ndarray, maximize: bool) -> np.ndarray:
    return values if maximize else -values


def _shuffles(sizes: list[int], rng: np.random.Generator, count: int) -> np.ndarray:
    """`count` random assignments of the pooled trials to groups of these sizes: an
    array of group numbers, one row per shuffle."""
    labels = np.repeat(np.arange(len(sizes)), sizes)
    order = rng.random((count, len(labels))).argsort(axis=1)
    return labels[order]


def _group_max(values: np.ndarray, labels: np.ndarray, groups: int) -> np.ndarray:
    """Per row of `labels`, the largest value of each group: (rows, groups)."""
    out = np.empty((labels.shape[0], groups))
    for g in range(groups):
        out[:, g] = np.where(labels == g, values[None, :], -np.inf).max(axis=1)
    return out


def _p(observed: float, shuffled: np.ndarray) -> float:
    return float((1 + np.sum(shuffled >= observed - 1e-12)) / (1 + len(shuffled)))


def _pair_p(a: np.ndarray, b: np.ndarray, labels: np.ndarray) -> float:
    """Two-sided: do a's and b's best values differ by more than shuffles give? (a is
    the best setting, picked from the same data: a one-sided test would call a setting
    equal to it worse about twice as often as ALPHA.)"""
    pooled = np.concatenate([a, b])
    best = _group_max(pooled, labels, 2)
    return _p(abs(a.max() - b.max()), np.abs(best[:, 0] - best[:, 1]))


def _interval(a: np.ndarray, b: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """95% interval of (best of a) - (best of b): the shifts d for which the two-sided
    test of a against b + d does not reject. A side the test cannot close with these
    trials (too few to ever reject) is infinite, never the edge of the search."""
    observed = a.max() - b.max()
    spread = max(np.ptp(np.concatenate([a, b])), 1e-9)

    def kept(d: float) -> bool:
        best = _group_max(np.concatenate([a, b + d]), labels, 2)
        stat = best[:, 0] - best[:, 1]
        seen = a.max() - (b + d).max()
        return min(1.0, 2 * min(_p(seen, stat), _p(-seen, -stat))) > ALPHA

    bounds = []
    for side in (-1.0, 1.0):
        reach = 2 * spread
        while kept(observed + side * reach):  # find a shift the test rejects
            reach *= 2
            if reach > 64 * spread:
                bounds.append(side * math.inf)
                break
        else:
            grid = np.linspace(0.0, reach, 81)
            inside = [r for r in grid if kept(observed + side * r)]
            bounds.append(observed + side * max(inside, default=0.0))
    return (float(bounds[0]), float(bounds[1]))


def compare(
    groups: list[list[float]],
    labels: list[str],
    maximize: bool,
    *,
    seed: int = 0,
    permutations: int = PERMUTATIONS,
    intervals: bool = True,
) -> Comparison:
    """Every setting against the best (groups: each setting's trial values)."""
    rng = np.random.default_rng(seed)
    values = [_orient(np.asarray(g, dtype=float), maximize) for g in groups]
    bests = np.array([v.max() for v in values])
    top = int(np.argmax(bests))
    pooled = np.concatenate(values)
    shuffled = _group_max(
        pooled, _shuffles([len(v) for v in values], rng, permutations), len(values)
    )
    p_all = _p(np.ptp(bests), np.ptp(shuffled, axis=1))
    others = [i for i in range(len(values)) if i != top]
    raw = {}
    pair_labels = {}
    for i in others:
        pair_labels[i] = _shuffles([len(values[top]), len(values[i])], rng, permutations)
        raw[i] = _pair_p(values[top], values[i], pair_labels[i])
    adjusted = _holm(raw)
    out = {}
    for i in others:
        interval = (math.nan, math.nan)
        if intervals:
            interval = _interval(values[top], values[i], pair_labels[i])
        out[i] = Difference(
            label=labels[i],
            difference=float(bests[top] - bests[i]),
            interval=interval,
            p=adjusted[i],
            worse=p_all < ALPHA and adjusted[i] < ALPHA,
        )
    return Comparison(p_all=p_all, top=top, differences=out)


def _holm(raw: dict[int, float]) -> dict[int, float]:
    order = sorted(raw, key=raw.get)
    adjusted, running = {}, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * raw[i]))
        adjusted[i] = running
    return adjusted


# --------------------------------------------------------------------- calibration


def _simulated_study(
    rng: np.random.Generator, settings: int, per_setting: int, seeds: int, worse: int | None
) -> list[list[float]]:
    """One made-up study with a known truth: every setting equal, except `worse`, which is
    EFFECT seed s.d. below. Each trial draws its nuisance parameter at random in [0, 1];
    away from the (unknown) best value it costs up to NUISANCE s.d.; each value is the
    mean of `seeds` runs with seed noise of s.d. 1."""
    best_at = rng.uniform(0.2, 0.8)
    groups = []
    for s in range(settings):
        u = rng.uniform(0.0, 1.0, per_setting)
        value = -NUISANCE * ((u - best_at) / 0.8) ** 2
        value += rng.normal(0.0, 1.0 / math.sqrt(seeds), per_setting)
        if s == worse:
            value -= EFFECT
        groups.append(value.tolist())
    return groups


@functools.lru_cache(maxsize=256)
def rates(
    settings: int, per_setting: int, seeds: int, studies: int = SIMULATED
) -> tuple[float, float]:
    """(false findings, power) of `compare` at this budget, measured on `studies`
    simulated studies each way: how often some setting is called worse when none is,
    and how often the one setting worse by EFFECT s.d. is called worse."""
    rng = np.random.default_rng(1000 * settings + 10 * per_setting + seeds)
    labels = [str(i) for i in range(settings)]
    false = found = 0
    for k in range(studies):
        null = _simulated_study(rng, settings, per_setting, seeds, None)
        verdict = compare(null, labels, True, seed=k, permutations=300, intervals=False)
        false += any(d.worse for d in verdict.differences.values())
        worse = int(rng.integers(settings))
        alt = _simulated_study(rng, settings, per_setting, seeds, worse)
        verdict = compare(alt, labels, True, seed=k, permutations=300, intervals=False)
        found += worse in verdict.differences and verdict.differences[worse].worse
    return false / studies, found / studies


def budget(settings: int, seeds: int, start: int = 2) -> int | None:
    """The fewest trials per setting (from `start`) at which `rates` finds an EFFECT
    difference POWER of the time (None: not within MOST_PER_SETTING)."""
    low, high = start, start
    while rates(settings, high, seeds)[1] < POWER:  # power grows with trials
        if high >= MOST_PER_SETTING:
            return None
        low, high = high + 1, min(MOST_PER_SETTING, 2 * high)
    while low < high:
        middle = (low + high) // 2
        if rates(settings, middle, seeds)[1] >= POWER:
            high = middle
        else:
            low = middle + 1
    return low
