"""The training system: loss, metrics and optimizer around any classifier network.

Knows nothing about convolutions: the network and the optimizer factory come in
as arguments (Lightning's style guide: keep the nn.Module apart from the system).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.nn import functional as F


class Classifier(L.LightningModule):
    """Cross-entropy training of `network`; loss and accuracy per epoch for train, val and test.

    Each step adds its summed loss, correct count and sample count to one small tensor on
    the device (no host sync); each epoch logs their ratios once, summed across processes
    when there are several. torchmetrics' per-step `update` and Lightning's per-step
    `self.log` each cost a visible share of a small network's step on a CPU.
    """

    def __init__(
        self,
        network: nn.Module,
        num_classes: int,
        optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer],
        scheduler: Callable[[torch.optim.Optimizer, int], Any] | None = None,
    ) -> None:
        super().__init__()
        self.network = network
        self.num_classes = num_classes
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self._totals: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x)

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        x, y = batch
        logits = self.network(x)
        loss = F.cross_entropy(logits, y)
        step = torch.stack((loss.detach() * len(y), (logits.detach().argmax(1) == y).sum()))
        totals = self._totals.get(stage)
        if totals is None:
            totals = self._totals[stage] = step.new_zeros(3, dtype=torch.float64)
        totals[:2] += step
        totals[2] += len(y)
        return loss

    def _log_epoch(self, stage: str) -> None:
        totals = self._totals.pop(stage, None)
        if totals is None:
            return
        if self.trainer.world_size > 1:
            totals = self.trainer.strategy.reduce(totals, reduce_op="sum")
        loss_sum, correct, count = totals.tolist()
        self.log(f"{stage}/loss", loss_sum / count)
        self.log(f"{stage}/acc", correct / count)

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def on_train_epoch_end(self) -> None:
        self._log_epoch("train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def test_step(self, batch, batch_idx):
        self._step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.network.parameters())
        if self.scheduler_factory is None:
            return optimizer
        steps = int(self.trainer.estimated_stepping_batches)
        scheduler = self.scheduler_factory(optimizer, steps)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


class Throughput(L.Callback):
    """Training images per second: wall time of the training batches, fetching included,
    validation excluded."""

    def __init__(self) -> None:
        self.images = 0
        self.seconds = 0.0
        self._mark = 0.0

    def _restart(self, *args) -> None:
        self._mark = time.perf_counter()

    on_train_epoch_start = _restart
    on_validation_end = _restart

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        now = time.perf_counter()
        self.seconds += now - self._mark
        self._mark = now
        self.images += len(batch[1])

    def on_train_epoch_end(self, trainer, pl_module):
        if self.seconds > 0:
            pl_module.log("train/images_per_s", self.images_per_second, on_epoch=True)

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0
