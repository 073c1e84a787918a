"""The training system: loss, metrics and optimizer around any classifier network.

Knows nothing about convolutions: the network and the optimizer factory come in
as arguments (Lightning's style guide: keep the nn.Module apart from the system).
"""

from __future__ import annotations

import math
import os
import signal
import time
from collections.abc import Callable, Iterable
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.loggers import MLFlowLogger
from torch import nn
from torch.nn import functional as F

from cnnstudy.errors import Diverged


class Totals:
    """Summed loss and correct count of one stage's batches, kept on the device.

    `add` costs five small tensor ops and no host sync; reading `as_tensor()` (loss sum,
    correct count, count) is the one sync, once per epoch.
    """

    def __init__(self) -> None:
        self.loss: torch.Tensor | None = None
        self.correct: torch.Tensor | None = None
        self.count = 0

    def add(self, logits: torch.Tensor, y: torch.Tensor, loss: torch.Tensor) -> None:
        correct = (logits.detach().argmax(1) == y).sum()
        if self.loss is None:
            self.loss = torch.zeros((), dtype=torch.float64, device=loss.device)
            self.correct = torch.zeros((), dtype=torch.int64, device=loss.device)
        self.loss.add_(loss.detach(), alpha=len(y))
        self.correct.add_(correct)
        self.count += len(y)

    def as_tensor(self) -> torch.Tensor:
        return torch.stack((self.loss, self.correct.double(), self.loss.new_tensor(self.count)))


def classify(
    network: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], totals: Totals
) -> torch.Tensor:
    """Cross-entropy of one batch, its loss and correct count added to `totals`."""
    x, y = batch
    logits = network(x)
    loss = F.cross_entropy(logits, y)
    totals.add(logits, y, loss)
    return loss


class Classifier(L.LightningModule):
    """Cross-entropy training of `network`; loss and accuracy per epoch for train, val and test.

    Each step adds its summed loss and correct count to tensors on the device (no host
    sync); each epoch logs their ratios once, summed across processes when there are
    several. torchmetrics' per-step `update` and Lightning's per-step `self.log` each cost
    a visible share of a small network's step on a CPU.

    Optimization is Lightning's manual mode: zero_grad, `manual_backward` (precision
    plugin and strategy included) and the optimizer and scheduler steps, once per batch.
    The same steps as automatic optimization, without its closure and extra hook calls:
    about 0.1 ms a step less, measured with a trivial network on this project's CPU.
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
        self.automatic_optimization = False
        self._totals: dict[str, Totals] = {}

    def __setattr__(self, name: str, value: Any) -> None:
        # Lightning sets `_current_fx_name` (a str) around every hook call, a dozen times a
        # step; nn.Module.__setattr__ would check it against parameters, buffers and modules.
        if name == "_current_fx_name":
            self.__dict__[name] = value
        else:
            super().__setattr__(name, value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x)

    sums_size = 3  # Totals.as_tensor(): loss sum, correct, count

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        totals = self._totals.get(stage)
        if totals is None:
            totals = self._totals[stage] = Totals()
        return classify(self.network, batch, totals)

    def _log_epoch(self, stage: str) -> None:
        totals = self._totals.pop(stage, None)
        several = self.trainer.world_size > 1
        if (totals is None or not totals.count) and not several:
            return
        if totals is None or not totals.count:  # every process takes part in the sum
            summed = torch.zeros(self.sums_size, dtype=torch.float64, device=self.device)
        else:
            summed = totals.as_tensor()
        if several:
            summed = self.trainer.strategy.reduce(summed, reduce_op="sum")
        *sums, count = summed.tolist()
        if not count:
            return
        if not math.isfinite(sums[0]) and stage != "test":
            raise Diverged(
                f"training diverged: {stage}/loss is {sums[0] / count} at epoch "
                f"{self.current_epoch} (a smaller optimizer.lr, or gradient clipping)"
            )
        shown = stage != "test"  # the progress bar shows train and val loss and accuracy
        for name, value in self.epoch_metrics(sums, count).items():
            self.log(f"{stage}/{name}", value, prog_bar=shown and name in ("loss", "acc", "rmse"))

    @staticmethod
    def epoch_metrics(sums: list[float], count: float) -> dict[str, float]:
        """A stage's metrics from its summed loss and correct count."""
        loss_sum, correct = sums
        return {"loss": loss_sum / count, "acc": correct / count}

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        optimizer.zero_grad(set_to_none=True)
        loss = self._step(batch, "train")
        self.manual_backward(loss)
        optimizer.step()
        if self.scheduler_factory is not None:
            self.lr_schedulers().step()

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
        return {"optimizer": optimizer, "lr_scheduler": scheduler}  # stepped per batch above


class RegressionTotals:
    """One stage's sums for a regression, kept on the device like Totals: the loss, the
    squared and absolute errors in the targets' units, the targets and their squares."""

    def __init__(self) -> None:
        self.sums: torch.Tensor | None = None
        self.count = 0

    def add(self, predicted: torch.Tensor, y: torch.Tensor, loss: torch.Tensor) -> None:
        error = predicted.detach().double() - y.double()
        y = y.double()
        sums = torch.stack(
            (
                loss.detach().double() * len(y),
                error.square().sum(),
                error.abs().sum(),
                y.sum(),
                y.square().sum(),
            )
        )
        self.sums = sums if self.sums is None else self.sums.add_(sums)
        self.count += len(y)

    def as_tensor(self) -> torch.Tensor:
        return torch.cat((self.sums, self.sums.new_tensor([self.count])))


class Regressor(Classifier):
    """Regression of one number a sample with the same network and training: the output
    unit predicts the standardized target ((y - mean) / std of the training targets),
    its loss the mean squared error there; RMSE, MAE and R2 are logged in the targets'
    own units (train/, val/, test/)."""

    sums_size = 6

    def __init__(self, network, target_mean: float, target_std: float, optimizer, scheduler=None):
        super().__init__(network, 1, optimizer, scheduler)
        self.target_mean, self.target_std = float(target_mean), float(target_std) or 1.0

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        totals = self._totals.get(stage)
        if totals is None:
            totals = self._totals[stage] = RegressionTotals()
        x, y = batch
        out = self.network(x).squeeze(1).float()  # float32 under mixed precision too
        y = y.float()
        loss = F.mse_loss(out, (y - self.target_mean) / self.target_std)
        totals.add(out * self.target_std + self.target_mean, y, loss)
        return loss

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Predictions in the targets' units."""
        return self.network(x).squeeze(1).float() * self.target_std + self.target_mean

    @staticmethod
    def epoch_metrics(sums: list[float], count: float) -> dict[str, float]:
        loss_sum, squared, absolute, total, total_sq = sums
        spread = total_sq - total * total / count  # the targets' sum of squares about their mean
        return {
            "loss": loss_sum / count,
            "rmse": math.sqrt(squared / count),
            "mae": absolute / count,
            "r2": 1.0 - squared / spread if spread > 0 else float("nan"),
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


class SignalCheck(L.Callback):
    """A safe point after every batch: SIGINT or SIGTERM noted during it stops the run
    (cnnstudy.run.lifecycle)."""

    def __init__(self, check: Callable[[], None]) -> None:
        self.check = check

    def on_train_batch_end(self, *args: Any) -> None:
        self.check()

    def on_validation_batch_end(self, *args: Any) -> None:
        self.check()

    def on_test_batch_end(self, *args: Any) -> None:
        self.check()


class RunLogger(MLFlowLogger):
    """Lightning's MLflow logger into the run cnnstudy opened, which cnnstudy ends itself,
    once, in the state the run reached (FINISHED, KILLED, FAILED): Lightning's own
    `finalize` would mark it FINISHED after the fit, before the test set and the
    pictures, and again after the test (two requests each, on a tracking server)."""

    def finalize(self, status: str = "success") -> None:
        return None


class RunProgressBar(RichProgressBar):
    """Lightning's rich bar, showing the run's loss and accuracy (per epoch) instead of
    the logger's version number."""

    def get_metrics(self, trainer, pl_module):
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics


class RankGuard(L.Callback):
    """In each process of a DDP run (spawned by Lightning): end with the process that
    started it, whatever kills that one (Linux's parent-death signal: SIGKILL, not
    torch's SIGINT, which a process started in the background ignores), and train with
    `threads` torch threads (default: this machine's cores shared among the processes)."""

    def __init__(self, threads: int = 0, quiet: tuple[str, ...] = ()) -> None:
        self.threads, self.quiet = threads, quiet  # warnings the run expects, silenced
        self.parent = os.getpid()

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if os.getpid() == self.parent:
            return
        import logging
        import warnings

        logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # the main says it
        for pattern in self.quiet:
            warnings.filterwarnings("ignore", message=pattern)
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
            if os.getppid() != self.parent:  # the parent died before the line above
                os._exit(1)
        except (OSError, AttributeError):  # not Linux: torch's own SIGINT stays
            pass
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
        torch.set_num_threads(self.threads or max(1, cores // trainer.world_size))
        import atexit

        atexit.register(_leave_process_group)


def _leave_process_group() -> None:
    """At a DDP process's exit: gloo's threads joined before the interpreter ends (left
    running, one of them sometimes aborts the process, and the fit with it)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
