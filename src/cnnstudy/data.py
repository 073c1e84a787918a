"""Data: images decoded once into uint8 tensors, split by seed, batched from memory.

A dataset is loaded once per process (`load_splits` keeps it by its settings), so a
sweep's next trial starts at once. Batches are cut from tensors already on the
training device: one shuffle-gather per epoch, then contiguous slices, standardized
per batch. No per-sample Python in the hot loop.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from torch.nn import functional as F

from cnnstudy.config import ConfigError


@dataclass
class Split:
    images: torch.Tensor  # uint8, N x C x H x W
    labels: torch.Tensor  # int64, N

    def __len__(self) -> int:
        return len(self.labels)

    def fingerprint(self) -> str:
        digest = hashlib.sha256(self.images.contiguous().numpy().tobytes())
        digest.update(self.labels.numpy().tobytes())
        return digest.hexdigest()[:16]


@dataclass
class Splits:
    train: Split
    val: Split
    test: Split

    def items(self) -> list[tuple[str, Split]]:
        return [("train", self.train), ("val", self.val), ("test", self.test)]

    def fingerprint(self) -> str:
        return hashlib.sha256(
            "".join(s.fingerprint() for _, s in self.items()).encode()
        ).hexdigest()[:16]


# ---------------------------------------------------------------------------- sources


def conform(images: torch.Tensor, channels: int, height: int, width: int) -> torch.Tensor:
    """Float images N x C x h x w (0-255) brought to channels x height x width, as uint8."""
    if images.shape[1] != channels:
        if images.shape[1] == 1:
            images = images.expand(-1, channels, -1, -1)
        elif channels == 1:  # ITU-R 601 luma, as PIL's convert("L")
            weights = torch.tensor([0.299, 0.587, 0.114], dtype=images.dtype).view(1, 3, 1, 1)
            images = (images[:, :3] * weights).sum(1, keepdim=True)
        else:
            raise ConfigError(
                f"data.channels={channels}: images have {images.shape[1]} channels; use 1 or "
                f"{images.shape[1]}"
            )
    if images.shape[-2:] != (height, width):
        images = F.interpolate(images, size=(height, width), mode="bilinear", align_corners=False)
    return images.round().clamp_(0, 255).to(torch.uint8).contiguous()


def _digits(data: Any) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy(bunch.images).float().unsqueeze(1) * (255.0 / 16.0)
    labels = torch.from_numpy(bunch.target).long()
    return conform(images, data.channels, data.height, data.width), labels


SOURCES = {"digits": _digits}


def _seeded_split(
    images: torch.Tensor, labels: torch.Tensor, fraction: float, seed: int
) -> tuple[Split, Split]:
    """(rest, held_out): `fraction` of the samples, drawn by `seed`, held out."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_out = int(round(len(labels) * fraction))
    keep, out = order[n_out:].sort().values, order[:n_out].sort().values
    return Split(images[keep], labels[keep]), Split(images[out], labels[out])


_cache: dict[tuple, Splits] = {}


def load_splits(data: Any) -> Splits:
    """Train/val/test splits for the data config, loaded once per process and settings."""
    key = (
        data.name,
        data.channels,
        data.height,
        data.width,
        data.val_fraction,
        data.test_fraction,
        data.split_seed,
    )
    if key not in _cache:
        if data.name not in SOURCES:
            raise ConfigError(
                f"data.name={data.name}: unknown dataset; valid: {', '.join(SOURCES)}"
            )
        images, labels = SOURCES[data.name](data)
        pool, test = _seeded_split(images, labels, data.test_fraction, data.split_seed)
        train, val = _seeded_split(pool.images, pool.labels, data.val_fraction, data.split_seed + 1)
        _cache.clear()  # one dataset at a time: a sweep over datasets does not pile them up
        _cache[key] = Splits(train, val, test)
    return _cache[key]


def channel_stats(images: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation of uint8 images, in pixel units (0-255)."""
    x = images.double().transpose(0, 1).reshape(images.shape[1], -1)
    return x.mean(1).tolist(), x.std(1).tolist()


# ---------------------------------------------------------------------------- batching


class TensorBatches:
    """Batches of standardized float images cut from uint8 tensors on the device.

    With `shuffle`, each epoch draws a new order from (seed, epoch), gathers the whole
    split once in that order, and slices it: contiguous slices are faster than a
    random gather per batch.
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
    ) -> None:
        self.images, self.labels = split.images, split.labels
        self.batch_size = batch_size
        self.mean, self.std = mean, std
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __len__(self) -> int:
        return math.ceil(len(self.labels) / self.batch_size)

    def __iter__(self):
        images, labels = self.images, self.labels
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(len(labels), generator=g).to(labels.device)
            images, labels = images[order], labels[order]
            self.epoch += 1
        for start in range(0, len(labels), self.batch_size):
            x = images[start : start + self.batch_size]
            x = x.to(torch.float32, memory_format=self.memory_format).sub_(self.mean).div_(self.std)
            yield x, labels[start : start + self.batch_size]


class ImageDataModule(L.LightningDataModule):
    def __init__(self, data: Any, seed: int = 0, channels_last: bool = False) -> None:
        super().__init__()
        self.cfg = data
        self.seed = seed
        self.channels_last = channels_last
        self.splits: Splits | None = None
        self.mean: list[float] = []
        self.std: list[float] = []

    def prepare(self) -> Splits:
        """Load the splits and fix the standardization; callable before a Trainer exists."""
        if self.splits is None:
            self.splits = load_splits(self.cfg)
            if self.cfg.mean and self.cfg.std:
                self.mean, self.std = list(self.cfg.mean), list(self.cfg.std)
            else:
                self.mean, self.std = channel_stats(self.splits.train.images)
                self.std = [s if s > 0 else 1.0 for s in self.std]
        return self.splits

    def setup(self, stage: str | None = None) -> None:
        splits = self.prepare()
        device = self.trainer.strategy.root_device if self.trainer else torch.device("cpu")
        self.on_device = {
            name: Split(s.images.to(device), s.labels.to(device)) for name, s in splits.items()
        }
        shape = (1, -1, 1, 1)
        self.mean_t = torch.tensor(self.mean, device=device).view(shape)
        self.std_t = torch.tensor(self.std, device=device).view(shape)

    def _batches(self, name: str, shuffle: bool = False) -> TensorBatches:
        return TensorBatches(
            self.on_device[name],
            self.cfg.batch_size,
            self.mean_t,
            self.std_t,
            shuffle=shuffle,
            seed=self.seed,
            channels_last=self.channels_last,
        )

    def train_dataloader(self) -> TensorBatches:
        return self._batches("train", shuffle=True)

    def val_dataloader(self) -> TensorBatches:
        return self._batches("val")

    def test_dataloader(self) -> TensorBatches:
        return self._batches("test")
