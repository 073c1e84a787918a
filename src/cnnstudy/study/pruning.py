"""Pruning inside training: the trial's first objective, reported at each validation epoch.

At `on_validation_end`, as Lightning's EarlyStopping: a callback's
`on_validation_epoch_end` runs before the LightningModule's, which logs the epoch's
metrics, and would read the epoch before's."""

from __future__ import annotations

import math
from typing import Any

import lightning as L

from cnnstudy.errors import Stopped


class PruneOnValidation(L.Callback):
    """Reports `metric` to the Optuna trial after every validation epoch, and stops the
    run (Stopped, state PRUNED) when the study's pruner says so."""

    def __init__(self, trial: Any, metric: str) -> None:
        self.trial, self.metric = trial, metric

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        value = trainer.callback_metrics.get(self.metric)
        if value is None:
            return
        value = float(value)
        if not math.isfinite(value):
            return
        epoch = trainer.current_epoch  # counted from 0, as the progress bar counts
        self.trial.report(value, step=epoch)
        if self.trial.should_prune():
            raise Stopped(
                f"pruned at epoch {epoch} (after {epoch + 1} of {trainer.max_epochs} epochs): "
                f"{self.metric}={value:.4f}",
                epochs=epoch + 1,
            )
