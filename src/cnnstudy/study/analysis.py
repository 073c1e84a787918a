"""What a study says about its question, with the uncertainty stated.

The standard (README: Reports): the scientific parameter is the one the question is about;
nuisance parameters are tuned for each of its settings (the isolation: the best trial at
each setting); settings are compared by one calibrated test (cnnstudy.study.verdict: a
permutation test of the best values, its interval by inverting it, its error rates
measured on simulated studies); the error distribution of every trial (EDF) shows the
design spaces beside it; a difference the test does not find is not a finding.

Only optuna, numpy and the standard library here: no torch, no MLflow.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any

from cnnstudy.study import verdict

REJECTED = "rejected"
MIN_PER_SETTING = 2  # complete trials at each setting: fewer cannot be tested at all
MAX_BINS = 5  # settings of a numeric scientific parameter with many distinct values
UNTUNED_GAP = 0.25  # a nuisance value this far (fraction of its range) from the best's
BOOTSTRAP = 1000


@dataclass
class Setting:
    """One value (or range) of the scientific parameter and the trials there."""

    label: str
    low: float | None  # numeric settings: the range the trials' values fall in
    high: float | None
    values: list[float]  # the objective of each complete trial here
    best: Any  # the best trial here (nuisance parameters tuned)
    best_value: float = 0.0
    spread: float | None = None  # the best trial's seed standard deviation (seeds > 1)
    difference: Any = None  # verdict.Difference against the best setting (None: the best)
    edf_x: list[float] = field(default_factory=list)
    edf: list[float] = field(default_factory=list)
    edf_band: tuple[list[float], list[float]] = ((), ())  # type: ignore[assignment]
    trials: list[Any] = field(default_factory=list)  # the complete trials here


@dataclass
class Analysis:
    study: Any
    objective: str
    maximize: bool
    question: str
    scientific: str | None
    nuisance: list[str]
    seeds: int
    trials: list[Any]  # complete, feasible trials
    settings: list[Setting]
    noise: float | None  # seed-to-seed standard deviation (median over trials), or None
    too_small: str | None  # why the study cannot answer, or None
    answer: str
    edges: list[str]  # warnings: the best value sits on the edge of the search space
    counts: dict[str, int]
    untuned: dict[str, str] = field(default_factory=dict)  # setting -> why it is confounded
    p_all: float | None = None  # the test of all settings at once
    rates: tuple[float, float] | None = None  # (false findings, power) at this budget
    needed: int | None = None  # trials per setting that reach verdict.POWER, when short
    baseline: Any = None  # the first trial, when enqueued: the config's own values

    @property
    def best(self) -> Any:
        if not self.trials:
            return None
        pick = max if self.maximize else min
        return pick(self.trials, key=lambda t: t.values[0])

    def error(self, value: float) -> float:
        """What the EDFs plot: error for an accuracy, else the objective as it is."""
        return 1.0 - value if self._is_accuracy else value

    @property
    def _is_accuracy(self) -> bool:
        return self.objective.endswith(("acc", "r2")) and self.maximize

    @property
    def error_name(self) -> str:
        return (
            f"{self.objective.split('/')[0]} error (1 - {self.objective})"
            if (self._is_accuracy)
            else self.objective
        )


def complete(study: Any) -> list[Any]:
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return [t for t in trials if REJECTED not in t.user_attrs and t.values]


def _fmt(value: float, objective: str) -> str:
    if objective.endswith("acc"):
        return f"{100 * value:.1f}%"
    return f"{value:.4g}"


def _spread_fmt(spread: float | None, objective: str) -> str:
    if spread is None:
        return ""
    if objective.endswith("acc"):
        return f" ± {100 * spread:.2f}" if spread < 0.001 else f" ± {100 * spread:.1f}"
    return f" ± {spread:.2g}"


def _label(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def _distribution(study: Any, key: str) -> Any:
    for trial in study.get_trials(deepcopy=False):
        if key in trial.distributions:
            return trial.distributions[key]
    return None


def _settings(
    study: Any, trials: list[Any], key: str, maximize: bool, seeds: int = 1
) -> list[Setting]:
    from optuna.distributions import CategoricalDistribution

    dist = _distribution(study, key)
    present = [t for t in trials if key in t.params]
    distinct = sorted({t.params[key] for t in present}, key=lambda v: (str(type(v)), v))
    groups: list[tuple[str, float | None, float | None, list[Any]]] = []
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in distinct)
    if isinstance(dist, CategoricalDistribution) or not numeric or len(distinct) <= MAX_BINS:
        order = list(dist.choices) if isinstance(dist, CategoricalDistribution) else distinct
        for value in order:
            members = [t for t in present if t.params[key] == value]
            if members:
                v = float(value) if numeric else None
                groups.append((_label(value), v, v, members))
    else:
        # equal-count bins of consecutive values: each holds about the same number of
        # trials (at least MIN_PER_SETTING where the study has enough), never split a value
        ordered = sorted(present, key=lambda t: t.params[key])
        count = _bins(len(ordered), seeds)
        size = len(ordered) / count
        chunks: list[list[Any]] = []
        for i, trial in enumerate(ordered):
            same = chunks and chunks[-1][-1].params[key] == trial.params[key]
            if not chunks or (i >= round(size * len(chunks)) and not same):
                chunks.append([])
            chunks[-1].append(trial)
        for members in chunks:
            values = [float(t.params[key]) for t in members]
            given = [t.params[key] for t in members]  # ints stay ints in the label
            label = f"{_label(min(given))}-{_label(max(given))}"
            if min(values) == max(values):
                label = _label(members[0].params[key])
            groups.append((label, min(values), max(values), members))
    out = []
    pick = max if maximize else min
    for label, low, high, members in groups:
        best = pick(members, key=lambda t: t.values[0])
        spread = best.user_attrs.get("seed_std")
        out.append(
            Setting(
                label=label,
                low=low,
                high=high,
                values=[t.values[0] for t in members],
                best=best,
                best_value=best.values[0],
                spread=float(spread[0]) if spread else None,
                trials=members,
            )
        )
    return out


def _bootstrap(settings: list[Setting], error: Any, maximize: bool, seed: int = 0) -> None:
    """Each setting's error EDF with a 95% band (resampling its trials, BOOTSTRAP times)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    every = [error(v) for s in settings for v in s.values]
    if not every:
        return
    xs = np.linspace(min(every), max(every), 60)
    for s in settings:
        values = np.asarray(s.values, dtype=float)
        samples = rng.choice(values, size=(BOOTSTRAP, len(values)), replace=True)
        errors = np.vectorize(error)(samples) if len(values) else samples
        curves = (errors[:, :, None] <= xs[None, None, :]).mean(axis=1)
        s.edf_x = xs.tolist()
        s.edf = (np.vectorize(error)(values)[:, None] <= xs[None, :]).mean(axis=0).tolist()
        s.edf_band = (
            np.percentile(curves, 2.5, axis=0).tolist(),
            np.percentile(curves, 97.5, axis=0).tolist(),
        )


def _bins(trials: int, seeds: int) -> int:
    """How many equal-count bins a numeric scientific parameter's trials make: the most
    (up to MAX_BINS) whose trials per bin let the test find a real difference
    verdict.POWER of the time (verdict.rates); else 2 (the study is then too small, and
    says what it needs)."""
    for count in range(min(MAX_BINS, trials // MIN_PER_SETTING), 2, -1):
        if verdict.rates(count, trials // count, seeds)[1] >= verdict.POWER:
            return count
    return max(1, min(2, trials // MIN_PER_SETTING))


def seed_noise(trials: list[Any]) -> float | None:
    """The study's seed-to-seed noise: the median over trials of the standard deviation
    of the first objective across a configuration's seeds (None with one seed)."""
    spreads = [float(t.user_attrs["seed_std"][0]) for t in trials if t.user_attrs.get("seed_std")]
    return statistics.median(spreads) if spreads else None


def _split(an: Analysis) -> tuple[Setting, list[Setting], list[Setting]]:
    """The top setting, those the test does not find worse (itself included), and the
    settings it finds worse."""
    top = next(s for s in an.settings if s.difference is None)
    far = [s for s in an.settings if s.difference is not None and s.difference.worse]
    return top, [s for s in an.settings if s not in far], far


def _answer(an: Analysis) -> str:
    """One or two sentences that say what the test says, and no more."""
    obj, key = an.objective, an.scientific
    top, close, far = _split(an)
    n = sum(len(s.values) for s in an.settings)

    def value(s: Setting) -> str:
        return f"{_fmt(s.best_value, obj)} at {s.label}"

    def worse(s: Setting) -> str:
        d = s.difference
        lo, hi = (_fmt_diff(v, obj) for v in d.interval)
        by = _fmt_diff(d.difference, obj)
        return f"{s.label} by {by} (95% interval {lo} to {hi}, p={d.p:.3f})"

    if not far and an.p_all >= verdict.ALPHA:
        text = (
            f"No detectable difference between the settings of {key} with {n} trials: best "
            f"{'; '.join(value(s) for s in an.settings)} (all settings tested at once: "
            f"p={an.p_all:.2f})."
        )
    elif not far:
        text = (
            f"The settings of {key} differ taken together (p={an.p_all:.3f}), but none is "
            f"found worse than the best one, {key}={top.label} ({_fmt(top.best_value, obj)}), "
            f"on its own after correction: best {'; '.join(value(s) for s in an.settings)}."
        )
    else:
        text = f"{key}={top.label} is best: {_fmt(top.best_value, obj)}. Worse: "
        text += "; ".join(worse(s) for s in far) + "."
        same = [s for s in close if s is not top]
        if same:
            text += (
                " No detectable difference from it: "
                + ", ".join(f"{s.label} (p={s.difference.p:.2f})" for s in same)
                + "."
            )
    if an.baseline is not None and key in an.baseline.params:
        base = an.baseline
        text += (
            f" Baseline (trial {base.number}, the config's own {key}="
            f"{_label(base.params[key])}): {_fmt(base.values[0], obj)}."
        )
    edge = _edge_of(an)
    if edge:
        text += f" The best is {edge}: the best value may lie beyond it; not a conclusion there."
    return text + _caveat(an)


def _fmt_diff(value: float, objective: str) -> str:
    if math.isinf(value):
        return "no bound" if value > 0 else "no bound below"
    if objective.endswith("acc"):
        return f"{100 * value:.1f} points"
    return f"{value:.3g}"


def _edge_of(an: Analysis) -> str:
    """Where the best trial's scientific value sits on the edge of the range searched
    (README: the edge warning), or ""."""
    best = an.best
    if best is None or an.scientific not in best.params:
        return ""
    marker = f"'s {an.scientific}="
    if not any(marker in w for w in _edges(an.study, best)):
        return ""
    return (
        f"at the edge of the range searched ({an.scientific}={_label(best.params[an.scientific])})"
    )


def _caveat(an: Analysis) -> str:
    if not an.untuned:
        return ""
    where = ", ".join(f"{an.scientific}={label}" for label in an.untuned)
    return (
        f" Not a finding for {where}: the nuisance parameters were not tried there near the "
        "values the best settings needed (confounded; see the warning)."
    )


def _position(dist: Any, value: Any) -> float | None:
    """Where a numeric value sits in its distribution's range, 0 to 1 (log scale where the
    space is log); None for a categorical distribution."""
    from optuna.distributions import FloatDistribution, IntDistribution

    if not isinstance(dist, (IntDistribution, FloatDistribution)):
        return None
    lo, hi, v = float(dist.low), float(dist.high), float(value)
    if dist.log:
        lo, hi, v = math.log(lo), math.log(hi), math.log(v)
    return (v - lo) / (hi - lo) if hi > lo else 0.0


def near(dist: Any, a: Any, b: Any) -> bool:
    """Whether two values of a nuisance parameter are close enough to count as the same
    tuning: within UNTUNED_GAP of the range (log scale where the space is log), or the
    same choice of a categorical one."""
    pa, pb = _position(dist, a), _position(dist, b)
    if pa is None or pb is None:
        return a == b
    return abs(pa - pb) <= UNTUNED_GAP


def _span(values: list[Any]) -> str:
    low, high = min(values), max(values)
    return _label(low) if low == high else f"{_label(low)}-{_label(high)}"


def _untuned(an: Analysis) -> dict[str, str]:
    """The settings that lost but whose nuisance parameters were never tried near the
    values the winning settings' best trials had: their loss may be the nuisance
    parameter's, not the scientific one's (Google's tuning playbook: nuisance parameters
    are tuned at each setting). Near: within UNTUNED_GAP of the range (log scale where
    the space is log), or the same choice."""
    if not an.nuisance or len(an.settings) < 2:
        return {}
    _, close, far = _split(an)
    refs = [s.best for s in close]
    found: dict[str, str] = {}
    for setting in far:
        reasons = []
        for key in an.nuisance:
            goals = [r for r in refs if key in r.params]
            tried = [t for t in setting.trials if key in t.params]
            if not goals or not tried:
                continue
            dist = goals[0].distributions[key]
            if not any(near(dist, t.params[key], r.params[key]) for t in tried for r in goals):
                reasons.append(
                    f"its {len(tried)} trial(s) had {key}={_span([t.params[key] for t in tried])}, "
                    f"the best trial(s) of {', '.join(s.label for s in close)} "
                    f"{key}={_span([r.params[key] for r in goals])}"
                )
        if reasons:
            found[setting.label] = "; ".join(reasons)
    return found


def untuned_warnings(an: Analysis) -> list[str]:
    return [
        f"{an.scientific}={label} may be worse only for want of tuning: {why}. Run more "
        "trials (hydra.sweeper.balance=true gives every setting its turn), or fix the "
        "nuisance parameter at a value every setting shares"
        for label, why in an.untuned.items()
    ]


def _edges(study: Any, best: Any) -> list[str]:
    """Warnings for each numeric parameter whose best value sits on the edge of its range
    (the outer 5% of a range, on a log scale where the space is log, or the first or
    last of ordered numeric choices): the optimum may lie outside the space."""
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    warnings = []
    if best is None:
        return warnings
    for key, value in best.params.items():
        dist = best.distributions.get(key)
        where = None
        if isinstance(dist, (IntDistribution, FloatDistribution)):
            lo, hi, v = float(dist.low), float(dist.high), float(value)
            if dist.log:
                lo, hi, v = math.log(lo), math.log(hi), math.log(v)
            if hi > lo:
                position = (v - lo) / (hi - lo)
                if position <= 0.05:
                    where = f"the low edge of [{dist.low}, {dist.high}]"
                elif position >= 0.95:
                    where = f"the high edge of [{dist.low}, {dist.high}]"
        elif isinstance(dist, CategoricalDistribution):
            choices = list(dist.choices)
            ordered = len(choices) > 2 and all(
                isinstance(c, (int, float)) and not isinstance(c, bool) for c in choices
            )
            if ordered and value in (min(choices), max(choices)):
                side = "smallest" if value == min(choices) else "largest"
                where = f"the {side} of the choices {choices}"
        if where:
            warnings.append(
                f"the best trial's {key}={_label(value)} sits on {where}: the best value may "
                "lie outside the search space; widen it to know"
            )
    return warnings


def analyse(study: Any) -> Analysis:
    attrs = study.user_attrs
    objectives = attrs.get("cnnstudy.objective") or ["objective"]
    objective = str(objectives[0])
    maximize = study.directions[0].name.lower() == "maximize"
    trials = complete(study)
    space_keys = sorted({k for t in study.get_trials(deepcopy=False) for k in t.distributions})
    scientific = list(attrs.get("cnnstudy.scientific") or [])
    nuisance = list(attrs.get("cnnstudy.nuisance") or [])
    key = next((k for k in scientific if k in space_keys), None)
    if key is None and space_keys:
        key = space_keys[0] if len(space_keys) == 1 else _most_important(study, space_keys)
    seeds = int(attrs.get("cnnstudy.seeds", 1))
    from optuna.trial import TrialState

    every = study.get_trials(deepcopy=False)
    counts = {
        "trials": len(every),
        "complete": len(trials),
        "pruned": sum(t.state == TrialState.PRUNED and REJECTED not in t.user_attrs for t in every),
        "rejected": sum(REJECTED in t.user_attrs for t in every),
        "failed": sum(t.state == TrialState.FAIL for t in every),
    }
    settings = _settings(study, trials, key, maximize, seeds) if key else []
    an = Analysis(
        study=study,
        objective=objective,
        maximize=maximize,
        question=str(attrs.get("cnnstudy.question") or ""),
        scientific=key,
        nuisance=nuisance,
        seeds=seeds,
        trials=trials,
        settings=settings,
        noise=seed_noise(trials) if seeds > 1 else None,
        too_small=None,
        answer="",
        edges=[],
        counts=counts,
    )
    _bootstrap(settings, an.error, maximize)
    enqueued = [  # trial 0, or its run again when its process died or was preempted
        t
        for t in trials
        if t.user_attrs.get("enqueued") and (t.number == 0 or t.user_attrs.get("retry_of") == 0)
    ]
    an.baseline = enqueued[0] if enqueued else None
    thin = [s.label for s in settings if len(s.values) < MIN_PER_SETTING]
    if len(settings) < 2 or thin:
        need = []
        if len(settings) < 2:
            need.append(f"{len(settings)} setting(s) of {key}, at least 2 needed")
        if thin:
            need.append(f"fewer than {MIN_PER_SETTING} complete trials at {key}={', '.join(thin)}")
        an.too_small = (
            "The study is too small to answer: " + "; ".join(need) + ". Run the same command "
            "with a larger hydra.sweeper.n_trials."
        )
        an.answer = an.too_small
    else:
        _compare(an)
        an.untuned = _untuned(an)
        per = min(len(s.values) for s in settings)
        an.rates = verdict.rates(len(settings), per, seeds)
        if an.rates[1] < verdict.POWER:
            an.needed = verdict.budget(len(settings), seeds, start=per + 1)
            an.too_small = _too_small(an, per)
            an.answer = an.too_small
        else:
            an.answer = _answer(an)
    an.edges = _edges(study, an.best)
    return an


def _compare(an: Analysis) -> None:
    """The verdict on every setting against the best (verdict.compare)."""
    result = verdict.compare(
        [s.values for s in an.settings], [s.label for s in an.settings], an.maximize
    )
    an.p_all = result.p_all
    for i, s in enumerate(an.settings):
        s.difference = result.differences.get(i)


def _too_small(an: Analysis, per: int) -> str:
    """The measured reason a study cannot answer, and what would let it."""
    false, power = an.rates
    k = len(an.settings)
    text = (
        f"The study is too small to answer: with {per} trials per setting of "
        f"{an.scientific} ({k} settings) and {an.seeds} seed(s), a difference of "
        f"{verdict.EFFECT:g} seed s.d. is found {100 * power:.0f}% of the time "
        f"({verdict.SIMULATED} simulated studies; a setting is called worse by chance "
        f"{100 * false:.1f}% of the time)."
    )
    if an.needed:
        text += (
            f" About {an.needed} trials per setting ({an.needed * k} in all, "
            f"hydra.sweeper.n_trials={an.needed * k}) find it {100 * verdict.POWER:.0f}% "
            "of the time; run the same command with that budget."
        )
    else:
        text += " More seeds (hydra.sweeper.seeds) or fewer settings would let it answer."
    top = max(an.settings, key=lambda s: s.best_value if an.maximize else -s.best_value)
    best = _fmt(top.best_value, an.objective)
    text += f" So far the best is {best} at {an.scientific}={top.label}."
    return text


def _most_important(study: Any, keys: list[str]) -> str:
    imp = importances(study)
    return next(iter(imp)) if imp else keys[0]


def importances(study: Any) -> dict[str, float]:
    """Optuna's default importance (PED-ANOVA in Optuna 5) of each parameter for the first
    objective; empty when the study has too few complete trials or one parameter."""
    import warnings

    import optuna

    if len(complete(study)) < 3:
        return {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return optuna.importance.get_param_importances(study, target=lambda t: t.values[0])
    except (ValueError, RuntimeError, ZeroDivisionError):
        return {}
