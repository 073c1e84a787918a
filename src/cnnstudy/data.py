"""Data: decoded once into uint8 tensors, cached on disk, split by seed, batched from memory.

`load_splits(data)` returns train/val/test splits for a data config. The first call
for a dataset and preprocessing decodes it (sources.py) and writes the uint8
tensors to cnnstudy's cache folder; later calls, in this process or the next,
read that file (memory-mapped) and never import torchvision. Batches are cut
from tensors already on the training device: one shuffle-gather per epoch, then
contiguous slices, augmented (shifts, flips) and standardized per batch. No
per-sample Python in the hot loop.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.nn import functional as F

from cnnstudy.config import ConfigError
from cnnstudy.datafiles import cache_root, file_identity
from cnnstudy.sources import SOURCES, Decoded

CACHE_FORMAT = 1


@dataclass
class Split:
    images: torch.Tensor  # uint8, N x C x H x W
    labels: torch.Tensor  # int64, N
    fingerprint: str = ""

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Splits:
    train: Split
    val: Split
    test: Split
    classes: list[str]
    source: str
    fingerprint: str  # of the decoded dataset and the split: equal means the same data
    skipped: list[str] = field(default_factory=list)
    from_cache: bool = False
    load_seconds: float = 0.0
    _train_stats: tuple[list[float], list[float]] | None = None

    def items(self) -> list[tuple[str, Split]]:
        return [("train", self.train), ("val", self.val), ("test", self.test)]

    def train_stats(self) -> tuple[list[float], list[float]]:
        """`channel_stats` of the training split, computed once per loaded splits: the next
        run in this process on the same data does not count its pixels again."""
        if self._train_stats is None:
            self._train_stats = channel_stats(self.train.images)
        means, stds = self._train_stats
        return list(means), list(stds)


# ---------------------------------------------------------------------------- cache


def cache_folder(data: Any) -> Path:
    """data.cache_dir, else $CNNSTUDY_CACHE, else $XDG_CACHE_HOME/cnnstudy or ~/.cache/cnnstudy."""
    if data.cache_dir:
        return Path(data.cache_dir).expanduser().resolve()
    return cache_root()


def decode_key(data: Any) -> str:
    """What the decoded tensors depend on: the source files as they are now, and preprocessing."""
    where = ""
    if data.name == "folder":
        where = str(Path(data.path).expanduser().resolve())
    elif data.name != "digits":
        where = str(Path(data.root).expanduser().resolve())
    settings = {
        "format": CACHE_FORMAT,
        "name": data.name,
        "where": where,
        "channels": data.channels,
        "height": data.height,
        "width": data.width,
        "fit": data.fit,
        "bad_images": data.bad_images,
        "files": file_identity(data),
    }
    if data.name == "digits":
        from importlib import metadata

        settings["sklearn"] = metadata.version("scikit-learn")
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:20]


def _fingerprint(*tensors: torch.Tensor) -> str:
    digest = hashlib.sha256()
    for t in tensors:
        digest.update(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def _decode_cached(data: Any) -> tuple[dict[str, Any], bool]:
    """The decoded dataset as a dict of tensors and plain data, and whether the cache held it."""
    key = decode_key(data)
    path = cache_folder(data) / f"{data.name}-{key}.pt"
    if path.is_file():
        try:
            return torch.load(path, weights_only=True, mmap=True), True
        except (OSError, RuntimeError, EOFError):  # a torn or foreign file: decode again
            pass
    decoded: Decoded = SOURCES[data.name](data)
    stored = {
        "images": decoded.images,
        "labels": decoded.labels,
        "classes": decoded.classes,
        "test_images": decoded.test_images,
        "test_labels": decoded.test_labels,
        "source": decoded.source,
        "skipped": decoded.skipped,
        "fingerprint": _fingerprint(
            decoded.images,
            decoded.labels,
            *(t for t in (decoded.test_images, decoded.test_labels) if t is not None),
        ),
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.partial")
        torch.save(stored, partial)
        os.replace(partial, path)  # atomic: parallel workers never read half a file
    except OSError as err:
        print(f"cnnstudy: warning: cannot write the data cache {path}: {err}")
    return stored, False


# ---------------------------------------------------------------------------- splits


def _seeded_split(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept, held_out) indices: `fraction` of range(n), drawn by `seed`, held out; both sorted."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_out = int(round(n * fraction))
    return order[n_out:].sort().values, order[:n_out].sort().values


_memo: dict[tuple, Splits] = {}


def load_splits(data: Any) -> Splits:
    """Train/val/test splits for the data config; decoded once, then from cache and memory.

    Datasets with a test split of their own (MNIST, CIFAR-10...) keep it as the test
    split; others hold out data.test_fraction, drawn by data.split_seed. Validation is
    data.val_fraction of what remains, drawn by data.split_seed + 1.
    """
    if data.name not in SOURCES:
        raise ConfigError(f"data.name={data.name}: unknown dataset; valid: {', '.join(SOURCES)}")
    started = time.perf_counter()
    key = (decode_key(data), data.val_fraction, data.test_fraction, data.split_seed)
    if key in _memo:
        return _memo[key]
    stored, from_cache = _decode_cached(data)
    images, labels = stored["images"], stored["labels"]
    if stored["test_images"] is not None:
        test = Split(stored["test_images"], stored["test_labels"])
        pool = torch.arange(len(labels))
    else:
        pool, test_idx = _seeded_split(len(labels), data.test_fraction, data.split_seed)
        test = Split(images[test_idx], labels[test_idx])
    keep, val_idx = _seeded_split(len(pool), data.val_fraction, data.split_seed + 1)
    train_idx, val_idx = pool[keep], pool[val_idx]
    train, val = (
        Split(images[train_idx], labels[train_idx]),
        Split(images[val_idx], labels[val_idx]),
    )
    for name, split, idx in (
        ("train", train, train_idx),
        ("val", val, val_idx),
        ("test", test, None),
    ):
        extra = b"" if idx is None else idx.numpy().tobytes()
        split.fingerprint = hashlib.sha256(
            stored["fingerprint"].encode() + name.encode() + extra
        ).hexdigest()[:16]
    splits = Splits(
        train,
        val,
        test,
        list(stored["classes"]),
        stored["source"],
        hashlib.sha256(
            "".join(s.fingerprint for _, s in (("", train), ("", val), ("", test))).encode()
        ).hexdigest()[:16],
        list(stored["skipped"]),
        from_cache,
        time.perf_counter() - started,
    )
    _memo.clear()  # one dataset at a time: a sweep over datasets does not pile them up
    _memo[key] = splits
    return splits


def channel_stats(images: torch.Tensor) -> tuple[list[float], list[float]]:
    """Exact per-channel mean and standard deviation of uint8 images, in pixel units (0-255),
    from a 256-bin histogram per channel (no float copy of the dataset)."""
    values = torch.arange(256, dtype=torch.float64)
    means, stds = [], []
    for c in range(images.shape[1]):
        # bincount takes the uint8 values as they are: no int64 copy of the dataset
        counts = torch.bincount(images[:, c].reshape(-1), minlength=256).double()
        n = counts.sum()
        mean = (counts * values).sum() / n
        var = (counts * (values - mean) ** 2).sum() / max(n - 1, 1)
        means.append(mean.item())
        stds.append(math.sqrt(var.item()))
    return means, stds


# ---------------------------------------------------------------------------- batching


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
    ) -> None:
        self.images, self.labels = split.images, split.labels
        self.batch_size = batch_size
        self.mean, self.std = mean, std
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0
        self.shift, self.flip = shift, flip
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __len__(self) -> int:
        return math.ceil(len(self.labels) / self.batch_size)

    def __iter__(self):
        images, labels = self.images, self.labels
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        if self.shuffle:
            order = torch.randperm(len(labels), generator=generator).to(labels.device)
            images, labels = images[order], labels[order]
            self.epoch += 1
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
        shape = (1, -1, 1, 1)
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
