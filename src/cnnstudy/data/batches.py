"""Batches of standardized float images cut from uint8 tensors already on the training device:
one shuffle-gather per epoch, then contiguous slices, augmented (shifts, flips) and
standardized per batch. No per-sample Python in the hot loop."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
from torch.nn import functional as F

from cnnstudy.data.splits import Split, Splits, load_splits


def shift_and_flip(
    x: torch.Tensor, shift: int, flip: bool, generator: torch.Generator
) -> torch.Tensor:
    """Random translations of up to `shift` pixels (zero fill) and random horizontal flips,
    drawn per image, applied to the whole batch at once."""
    n, c, h, w = x.shape
    if shift > 0:
        padded = F.pad(x, (shift, shift, shift, shift))
        dy = torch.randint(0, 2 * shift + 1, (n, 1), generator=generator).to(x.device)
        dx = torch.randint(0, 2 * shift + 1, (n, 1), generator=generator).to(x.device)
        rows = (dy + torch.arange(h, device=x.device)).view(n, 1, h, 1)
        cols = (dx + torch.arange(w, device=x.device)).view(n, 1, 1, w)
        batch = torch.arange(n, device=x.device).view(n, 1, 1, 1)
        chans = torch.arange(c, device=x.device).view(1, c, 1, 1)
        x = padded[batch, chans, rows, cols]
    if flip:
        mask = (torch.rand(n, generator=generator) < 0.5).to(x.device).view(n, 1, 1, 1)
        x = torch.where(mask, x.flip(-1), x)
    return x


class TensorBatches:
    """Batches of standardized float images cut from uint8 tensors.

    With `shuffle`, each epoch draws a new order from (seed, epoch), gathers the whole
    split once in that order, and slices it: contiguous slices are faster than a
    random gather per batch. Augmentation (training only) is drawn from the same seed.
    """

    def __init__(
        self,
        split: Split,
        batch_size: int,
        mean: torch.Tensor,
        std: torch.Tensor,
        shuffle: bool = False,
        seed: int = 0,
        channels_last: bool = False,
        shift: int = 0,
        flip: bool = False,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        self.images, self.labels = split.images, split.labels
        self.rank, self.world = rank, world
        self.batch_size = batch_size
        self.mean, self.std = mean, std
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0
        self.shift, self.flip = shift, flip
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def _size(self) -> int:
        """Images this process sees: with DDP (`world` processes), training shards are cut
        to equal sizes (every process takes as many optimizer steps, each step's
        gradients averaged across them); evaluation shards cover the split once."""
        n = len(self.labels)
        if self.world == 1:
            return n
        if self.shuffle:
            return n // self.world
        return len(range(self.rank, n, self.world))

    def __len__(self) -> int:
        return math.ceil(self._size() / self.batch_size)

    def __iter__(self):
        images, labels = self.images, self.labels
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        if self.shuffle:  # the same order in every process: their shards are disjoint
            order = torch.randperm(len(labels), generator=generator).to(labels.device)
            if self.world > 1:
                order = order[: self._size() * self.world][self.rank :: self.world]
            images, labels = images[order], labels[order]
            self.epoch += 1
        elif self.world > 1:
            images, labels = images[self.rank :: self.world], labels[self.rank :: self.world]
        augment = self.shift > 0 or self.flip
        for start in range(0, len(labels), self.batch_size):
            x = images[start : start + self.batch_size]
            if augment:
                x = shift_and_flip(x, self.shift, self.flip, generator)
            x = x.to(self.mean.device, non_blocking=True)
            # uint8 - float32 is float32: two passes over the batch, not three
            x = torch.sub(x, self.mean).div_(self.std).contiguous(memory_format=self.memory_format)
            yield x, labels[start : start + self.batch_size].to(self.mean.device, non_blocking=True)


def fits_on(device: torch.device, splits: Splits) -> bool:
    """Whether the uint8 splits fit comfortably (half the free memory) on the device."""
    if device.type != "cuda":
        return True
    need = sum(s.images.numel() + s.labels.numel() * 8 for _, s in splits.items())
    free, _ = torch.cuda.mem_get_info(device)
    return need < free / 2


class ImageDataModule(L.LightningDataModule):
    def __init__(self, data: Any, seed: int = 0, channels_last: bool = False) -> None:
        super().__init__()
        self.cfg = data
        self.seed = seed
        self.channels_last = channels_last
        self.splits: Splits | None = None
        self.mean: list[float] = []
        self.std: list[float] = []
        self.on_device: dict[str, Split] = {}

    def prepare(self) -> Splits:
        """Load the splits and fix the standardization; callable before a Trainer exists."""
        if self.splits is None:
            self.splits = load_splits(self.cfg)
            if self.cfg.mean and self.cfg.std:
                self.mean, self.std = list(self.cfg.mean), list(self.cfg.std)
            else:
                self.mean, self.std = self.splits.train_stats()
                self.std = [s if s > 0 else 1.0 for s in self.std]
        return self.splits

    def setup(self, stage: str | None = None) -> None:
        splits = self.prepare()
        device = self.trainer.strategy.root_device if self.trainer else torch.device("cpu")
        where = device if fits_on(device, splits) else torch.device("cpu")
        self.on_device = {
            name: Split(s.images.to(where), s.labels.to(where)) for name, s in splits.items()
        }
        shape = (1, -1) + (1,) * (splits.train.images.dim() - 2)  # channels of any axes
        self.mean_t = torch.tensor(self.mean, device=device).view(shape)
        self.std_t = torch.tensor(self.std, device=device).view(shape)

    def _batches(self, name: str, train: bool = False) -> TensorBatches:
        return TensorBatches(
            self.on_device[name],
            self.cfg.batch_size,
            self.mean_t,
            self.std_t,
            shuffle=train,
            seed=self.seed,
            channels_last=self.channels_last,
            shift=self.cfg.augment_shift if train else 0,
            flip=self.cfg.augment_flip if train else False,
            rank=self.trainer.global_rank if self.trainer else 0,
            world=self.trainer.world_size if self.trainer else 1,
        )

    def transfer_batch_to_device(self, batch, device: torch.device, dataloader_idx: int):
        # batches are cut on the device already, unless the data did not fit there
        x, y = batch
        if x.device == device and y.device == device:
            return batch
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def train_dataloader(self) -> TensorBatches:
        return self._batches("train", train=True)

    def val_dataloader(self) -> TensorBatches:
        return self._batches("val")

    def test_dataloader(self) -> TensorBatches:
        return self._batches("test")
