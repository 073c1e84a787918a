"""Pruning inside training: the trial's first objective, reported at each validation epoch.

At `on_validation_end`, as Lightning's EarlyStopping: a callback's
`on_validation_epoch_end` runs before the LightningModule's, which logs the epoch's
metrics, and would read the epoch before's."""

from __future__ import annotations

import math
from typing import Any

import lightning as L

from cnnstudy.errors import Stopped

PRUNED = "pruned_in_ddp"  # user attribute: [reason, epochs trained]


class PruneOnValidation(L.Callback):
    """Reports `metric` to the Optuna trial after every validation epoch, and stops the
    run (Stopped, state PRUNED) when the study's pruner says so."""

    def __init__(self, trial: Any, metric: str) -> None:
        self.trial, self.metric = trial, metric

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.world_size > 1:
            self._decide_on_rank_zero(trainer)
            return
        said = self._decide(trainer)
        if said is not None:
            raise Stopped(said[0], epochs=said[1])

    def _decide(self, trainer: L.Trainer) -> tuple[str, int] | None:
        """Report the metric (all processes' value: the classifier sums across them); the
        reason and epochs trained when the pruner says stop."""
        value = trainer.callback_metrics.get(self.metric)
        if value is None:
            return None
        value = float(value)
        if not math.isfinite(value):
            return None
        epoch = trainer.current_epoch  # counted from 0, as the progress bar counts
        self.trial.report(value, step=epoch)
        if not self.trial.should_prune():
            return None
        return (
            f"pruned at epoch {epoch} (after {epoch + 1} of {trainer.max_epochs} epochs): "
            f"{self.metric}={value:.4f}",
            epoch + 1,
        )

    def _decide_on_rank_zero(self, trainer: L.Trainer) -> None:
        """DDP: process 0 reports and asks the pruner; every process gets its answer (a
        raise in one process would leave the others waiting) and stops after this epoch.
        The decision is a user attribute of the trial, read back by the process that
        started the fit (`raise_if_stopped`): spawned processes return nothing else."""
        said = self._decide(trainer) if trainer.is_global_zero else None
        said = trainer.strategy.broadcast(said, src=0)
        if said is None:
            return
        if trainer.is_global_zero:
            self.trial.set_user_attr(PRUNED, list(said))
        trainer.should_stop = True

    def raise_if_stopped(self) -> None:
        number = self.trial.number  # read from the storage: this process's copy of the
        stored = [t for t in self.trial.study.get_trials(deepcopy=False) if t.number == number]
        said = stored[0].user_attrs.get(PRUNED) if stored else None  # trial is not updated
        if said:
            raise Stopped(str(said[0]), epochs=int(said[1]))
