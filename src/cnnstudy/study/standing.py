"""Where a study stands, read from its trials: how many count towards `n_trials`, the
best trial, the Pareto front. Read by the loop, a trial, the balance and the summary;
imports nothing of the study wing."""

from __future__ import annotations

from typing import Any

REJECTED = "rejected"  # user attribute of a trial whose network failed the shape check


def finished_count(study: Any, trials: list[Any] | None = None) -> int:
    """Complete or pruned trials (of `trials`, else of the study), not counting rejected
    architectures."""
    from optuna.trial import TrialState

    done = (TrialState.COMPLETE, TrialState.PRUNED)
    if trials is None:
        trials = study.get_trials(deepcopy=False, states=done)
    return sum(t.state in done and REJECTED not in t.user_attrs for t in trials)


def best_trial(study: Any) -> Any:
    """The best complete trial of a one-objective study, or None."""
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete or len(study.directions) > 1:
        return None
    return study.best_trial


def pareto_front(study: Any) -> list[Any]:
    """The Pareto front of a study with several objectives (complete trials)."""
    from optuna.trial import TrialState

    if len(study.directions) < 2:
        return []
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return []
    return sorted(study.best_trials, key=lambda t: t.number)
