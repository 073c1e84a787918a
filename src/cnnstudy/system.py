"""The training system: loss, metrics and optimizer around any classifier network.

Knows nothing about convolutions: the network and the optimizer factory come in
as arguments (Lightning's style guide: keep the nn.Module apart from the system).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import lightning as L
import torch
from torch import nn
from torch.nn import functional as F
from torchmetrics.classification import MulticlassAccuracy


class Classifier(L.LightningModule):
    def __init__(
        self,
        network: nn.Module,
        num_classes: int,
        optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer],
    ) -> None:
        super().__init__()
        self.network = network
        self.optimizer_factory = optimizer
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x)

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str, acc: MulticlassAccuracy):
        x, y = batch
        logits = self.network(x)
        loss = F.cross_entropy(logits, y)
        acc.update(logits, y)
        self.log(f"{stage}/loss", loss, on_step=False, on_epoch=True, batch_size=len(y))
        self.log(f"{stage}/acc", acc, on_step=False, on_epoch=True)
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train", self.train_acc)

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val", self.val_acc)

    def test_step(self, batch, batch_idx):
        self._step(batch, "test", self.test_acc)

    def configure_optimizers(self):
        return self.optimizer_factory(self.network.parameters())


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
