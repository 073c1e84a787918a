"""Grid studies: a plain comma multirun, every combination once, resumable.

Optuna's grid sampler counts a failed combination as visited and would never run it
again: the next run of the same command queues it again here.
"""

from __future__ import annotations

import datetime
import itertools
from typing import Any

from cnnstudy.study import space as spaces
from cnnstudy.study.standing import REJECTED


def _key(params: dict[str, Any]) -> str:
    return repr(sorted(params.items()))


class Grid:
    def __init__(self, grid: dict[str, list[Any]], started: datetime.datetime) -> None:
        self.grid = grid
        keys = list(grid)
        self.points = [dict(zip(keys, v, strict=True)) for v in itertools.product(*grid.values())]
        self.started = started  # this command's start, Optuna's clock (naive local time)

    def _point_trials(self, study: Any) -> list[tuple[dict[str, Any], list[Any]]]:
        """Each combination of the grid with its trials."""
        by_params: dict[str, list[Any]] = {}
        for trial in study.get_trials(deepcopy=False):
            params = trial.params or trial.system_attrs.get("fixed_params", {})  # WAITING
            by_params.setdefault(_key(params), []).append(trial)
        return [(point, by_params.get(_key(point), [])) for point in self.points]

    def pending(self, study: Any) -> int:
        """How many combinations still to try in this command (under the storage lock).
        One that failed in an earlier command is queued again; one tried in this command
        waits for the next command."""
        from optuna.trial import TrialState

        pending = 0
        for point, trials in self._point_trials(study):
            states = {t.state for t in trials}
            if states & {TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING}:
                continue
            if TrialState.WAITING in states or not trials:
                pending += 1
                continue
            if all(t.datetime_start is None or t.datetime_start < self.started for t in trials):
                study.enqueue_trial(point, user_attrs={"retry": True})
                pending += 1
        return pending

    def unfinished(self, study: Any) -> list[str]:
        """The combinations with no finished trial, each with its last reason."""
        from optuna.trial import TrialState

        unfinished = []
        for point, trials in self._point_trials(study):
            done = [
                t
                for t in trials
                if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
                and REJECTED not in t.user_attrs
            ]
            if done:
                continue
            last = trials[-1].user_attrs if trials else {}
            why = last.get(REJECTED) or last.get("fail_reason") or "not run"
            combination = " ".join(f"{k}={spaces.override_value(v)}" for k, v in point.items())
            unfinished.append(f"{combination} ({why})")
        return unfinished
