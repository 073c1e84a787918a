"""What a study says about its question, with the uncertainty stated.

The standard (README: Reports): the scientific parameter is the one the question is about;
nuisance parameters are tuned for each of its settings (the isolation: the best trial at
each setting); design choices are compared by the error distribution of every trial
(EDF) rather than by one best trial; differences within seed noise (or within the
bootstrap interval, when each configuration has one seed) are not findings.

Only optuna, numpy and the standard library here: no torch, no MLflow.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any

REJECTED = "rejected"
MIN_TRIALS = 6  # complete trials in all, to answer anything
MIN_PER_SETTING = 2  # complete trials at each setting of the scientific parameter
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
    interval: tuple[float, float] = (0.0, 0.0)  # bootstrap 95% interval of the best value
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
        return self.objective.endswith("acc") and self.maximize

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


def _settings(study: Any, trials: list[Any], key: str, maximize: bool) -> list[Setting]:
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
        count = max(1, min(MAX_BINS, len(ordered) // MIN_PER_SETTING))
        size = len(ordered) / count
        chunks: list[list[Any]] = []
        for i, trial in enumerate(ordered):
            same = chunks and chunks[-1][-1].params[key] == trial.params[key]
            if not chunks or (i >= round(size * len(chunks)) and not same):
                chunks.append([])
            chunks[-1].append(trial)
        for members in chunks:
            values = [float(t.params[key]) for t in members]
            label = f"{_label(min(values))}-{_label(max(values))}"
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
    """Each setting's bootstrap 95% interval of its best value, and its error EDF with a
    95% band (resampling its trials, BOOTSTRAP times)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    every = [error(v) for s in settings for v in s.values]
    if not every:
        return
    xs = np.linspace(min(every), max(every), 60)
    for s in settings:
        values = np.asarray(s.values, dtype=float)
        samples = rng.choice(values, size=(BOOTSTRAP, len(values)), replace=True)
        bests = samples.max(axis=1) if maximize else samples.min(axis=1)
        s.interval = (float(np.percentile(bests, 2.5)), float(np.percentile(bests, 97.5)))
        errors = np.vectorize(error)(samples) if len(values) else samples
        curves = (errors[:, :, None] <= xs[None, None, :]).mean(axis=1)
        s.edf_x = xs.tolist()
        s.edf = (np.vectorize(error)(values)[:, None] <= xs[None, :]).mean(axis=0).tolist()
        s.edf_band = (
            np.percentile(curves, 2.5, axis=0).tolist(),
            np.percentile(curves, 97.5, axis=0).tolist(),
        )


def seed_noise(trials: list[Any]) -> float | None:
    """The study's seed-to-seed noise: the median over trials of the standard deviation
    of the first objective across a configuration's seeds (None with one seed)."""
    spreads = [float(t.user_attrs["seed_std"][0]) for t in trials if t.user_attrs.get("seed_std")]
    return statistics.median(spreads) if spreads else None


def _noise(an: Analysis, a: Setting, b: Setting) -> tuple[float, str]:
    """How far apart the best values of two settings may be by chance, and what says so:
    the larger of twice the standard deviation of a difference of two means of `seeds`
    runs each (the study's seed noise) and the two bootstrap intervals' half-widths
    combined (which setting's trials happened to be sampled)."""
    half = lambda s: (s.interval[1] - s.interval[0]) / 2  # noqa: E731
    sampled = math.hypot(half(a), half(b))
    if an.noise is None:
        return sampled, "the bootstrap interval"
    return max(2.0 * an.noise * math.sqrt(2.0 / an.seeds), sampled), "noise"


def _answer(an: Analysis) -> str:
    """One or two sentences drawn from the data."""
    obj = an.objective
    settings = an.settings
    key = an.scientific

    def said(s: Setting) -> str:
        return f"{_fmt(s.best_value, obj)}{_spread_fmt(s.spread, obj)} at {key}={s.label}"

    def labels(group: list[Setting]) -> str:
        return ", ".join(s.label for s in group)

    top, close, far = _split(an)
    _, by = _noise(an, top, top)
    if an.noise is not None:
        unit = " points" if obj.endswith("acc") else ""
        spread = _spread_fmt(an.noise, obj).removeprefix(" ± ")
        by += f" (seed s.d. {spread}{unit}, median over trials; bootstrap intervals of each best)"
    numeric = all(s.low is not None for s in settings)
    if numeric and len(settings) > 1:
        smallest = min(close, key=lambda s: s.low)
        if smallest is not top:
            text = (
                f"{obj} stops improving beyond about {key}={smallest.label}: {said(smallest)} "
                f"vs {said(top)}, within {by}."
            )
        else:
            value = f"{_fmt(top.best_value, obj)}{_spread_fmt(top.spread, obj)}"
            text = f"{obj} is best at {key}={top.label}: {value}."
            larger = [s for s in close if s is not top]
            if larger:
                text += f" Larger settings ({labels(larger)}) are within {by} of it."
        if far:
            text += f" {labels(far)}: worse by more than that."
        return text + _caveat(an)
    text = f"{key}={top.label} is best: {_fmt(top.best_value, obj)}{_spread_fmt(top.spread, obj)}."
    tied = [s for s in close if s is not top]
    if tied:
        text += f" {labels(tied)} {'is' if len(tied) == 1 else 'are'} within {by} of it."
    if far:
        margin = "that" if tied else by
        text += f" {labels(far)} {'is' if len(far) == 1 else 'are'} worse by more than {margin}."
    return text + _caveat(an)


def _split(an: Analysis) -> tuple[Setting, list[Setting], list[Setting]]:
    """The top setting, those within noise of it (itself included), and the rest."""
    pick = max if an.maximize else min
    top = pick(an.settings, key=lambda s: s.best_value)
    close = [s for s in an.settings if abs(s.best_value - top.best_value) <= _noise(an, s, top)[0]]
    return top, close, [s for s in an.settings if s not in close]


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
    settings = _settings(study, trials, key, maximize) if key else []
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
    thin = [s.label for s in settings if len(s.values) < MIN_PER_SETTING]
    if len(trials) < MIN_TRIALS or len(settings) < 2 or thin:
        need = []
        if len(trials) < MIN_TRIALS:
            need.append(f"{len(trials)} complete trials, at least {MIN_TRIALS} needed")
        if len(settings) < 2:
            need.append(f"{len(settings)} setting(s) of {key}, at least 2 needed")
        if thin:
            need.append(f"fewer than {MIN_PER_SETTING} complete trials at {key}={', '.join(thin)}")
        an.too_small = (
            "The study is too small to answer: " + "; ".join(need) + ". Run the same command "
            "with a larger hydra.sweeper.n_trials (and hydra.sweeper.seeds=3 for seed noise)."
        )
        an.answer = an.too_small
    else:
        an.untuned = _untuned(an)
        an.answer = _answer(an)
        if seeds < 2:
            an.answer += (
                " Each configuration trained with one seed: the interval is the bootstrap's "
                "over trials, not seed noise (hydra.sweeper.seeds=3 measures it)."
            )
    an.edges = _edges(study, an.best)
    return an


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
