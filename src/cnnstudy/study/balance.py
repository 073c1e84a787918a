"""Balanced studies: the settings of a categorical scientific parameter take turns.

Left to a sampler like TPE, a setting that started badly gets few trials, and the
nuisance parameters are never tuned there (README: Reports, confounding). Each new trial
is queued at the setting with the fewest trials so far; the sampler picks the rest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cnnstudy.study import space as spaces
from cnnstudy.study.settings import Settings
from cnnstudy.study.standing import REJECTED, best_trial


@dataclass
class Balance:
    key: str  # the scientific parameter whose settings take turns
    choices: list[Any]
    nuisance: list[str]

    @classmethod
    def of(cls, settings: Settings, space: dict[str, Any], grid: bool) -> Balance | None:
        """The balance of a study: the first categorical scientific parameter of the space,
        in a one-objective study that is not a grid; else None."""
        from optuna.distributions import CategoricalDistribution

        if not settings.balance or grid or len(settings.objectives) > 1:
            return None
        for key in settings.scientific:
            if isinstance(space.get(key), CategoricalDistribution):
                return cls(key, list(space[key].choices), list(settings.nuisance))
        return None

    def queue_next(self, study: Any) -> None:
        """Queue a trial at the setting with the fewest trials so far (every state counts:
        a rejected setting has had its turn), unless trials are already waiting (enqueue:,
        retries); called under the storage's lock. A setting whose finished trials never
        had the nuisance parameters near the best trial's values gets those values (the
        rest the sampler's): each setting is tried where the others did best, so that it
        does not lose for want of tuning."""
        from optuna.trial import TrialState

        from cnnstudy.study.analysis import near

        key = self.key
        trials = study.get_trials(deepcopy=False)
        if any(t.state == TrialState.WAITING for t in trials):
            return

        def value_of(trial: Any) -> str | None:
            value = trial.params.get(key, trial.system_attrs.get("fixed_params", {}).get(key))
            return None if value is None else spaces.override_value(value)

        values = [value_of(t) for t in trials]
        count = {spaces.override_value(c): 0 for c in self.choices}
        for value in values:
            if value in count:
                count[value] += 1
        setting = min(self.choices, key=lambda c: count[spaces.override_value(c)])  # first tie
        label = spaces.override_value(setting)
        params: dict[str, Any] = {key: setting}
        attrs: dict[str, Any] = {"balanced": key}
        best = best_trial(study)
        nuisance = [n for n in self.nuisance if best is not None and n in best.params]
        here = [
            t
            for t, value in zip(trials, values, strict=True)
            if value == label
            and t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
            and REJECTED not in t.user_attrs
        ]
        if nuisance and here and value_of(best) != label:
            dists = best.distributions
            if not any(
                all(n in t.params and near(dists[n], t.params[n], best.params[n]) for n in nuisance)
                for t in here
            ):
                params.update({n: best.params[n] for n in nuisance})
                attrs["nuisance_from"] = best.number
        study.enqueue_trial(params, user_attrs=attrs)
