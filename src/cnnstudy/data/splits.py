"""Decoded once into uint8 tensors, cached on disk, split by seed.

`load_splits(data)` returns train/val/test splits for a data config. The first call
for a dataset and preprocessing decodes it (sources.py) and writes the uint8
tensors to cnnstudy's cache folder; later calls, in this process or the next,
read that file (memory-mapped) and never import torchvision; later calls in the
same process reuse the splits in memory.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from cnnstudy.cache import cache_root
from cnnstudy.data.files import file_identity
from cnnstudy.data.sources import SOURCES, Decoded
from cnnstudy.errors import ConfigError

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
    loaded_from: str = "decoded"  # decoded (from the source files), cache (disk) or memory
    load_seconds: float = 0.0
    # the training split's pixel statistics, shared by every copy of these splits
    _stats: dict[str, tuple[list[float], list[float]]] = field(default_factory=dict)

    def items(self) -> list[tuple[str, Split]]:
        return [("train", self.train), ("val", self.val), ("test", self.test)]

    def train_stats(self) -> tuple[list[float], list[float]]:
        """`channel_stats` of the training split, computed once per loaded splits: the next
        run in this process on the same data does not count its pixels again."""
        if "train" not in self._stats:
            self._stats["train"] = channel_stats(self.train.images)
        means, stds = self._stats["train"]
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
    elif data.name in ("npz", "csv"):
        where = str(Path(data.path).expanduser().resolve())
        if data.name == "csv" and data.test_path:
            where += "|" + str(Path(data.test_path).expanduser().resolve())
    elif data.name != "digits":
        where = str(Path(data.root).expanduser().resolve())
    settings = {
        "format": CACHE_FORMAT,
        "name": data.name,
        "where": where,
        "channels": data.channels,
        "height": data.height,
        "width": data.width,
        "length": data.get("length"),
        "depth": data.get("depth"),
        "fit": data.fit,
        "bad_images": data.bad_images,
        "files": file_identity(data),
    }
    if data.name == "ucr":
        settings["series"] = [data.problem, data.task, data.unequal]
    if data.name == "moving_mnist":
        settings["clips"] = [data.clips, data.clip_seed]
        if data.get("digits", 1) != 1:  # one digit: the key it always had
            settings["clips"].append(data.digits)
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
        from cnnstudy.log import get

        get("data").warning(f"cnnstudy: warning: cannot write the data cache {path}: {err}")
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
    if key in _memo:  # this call's own source and time, the same tensors
        found = replace(
            _memo[key], loaded_from="memory", load_seconds=time.perf_counter() - started
        )
        return subset(found, list(data.classes)) if data.classes else found
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
        "cache" if from_cache else "decoded",
        time.perf_counter() - started,
    )
    _memo.clear()  # one dataset at a time: a sweep over datasets does not pile them up
    _memo[key] = splits
    if data.classes:
        return subset(splits, list(data.classes))
    return splits


def subset(splits: Splits, keep: list[int]) -> Splits:
    """Only the images of the classes `keep` (indices), relabelled 0..k-1 in that order."""
    if max(keep) >= len(splits.classes):
        raise ConfigError(
            f"data.classes={keep}: this dataset has {len(splits.classes)} classes "
            f"(0..{len(splits.classes) - 1}: {', '.join(splits.classes[:12])})"
        )
    lookup = torch.full((len(splits.classes),), -1, dtype=torch.long)
    lookup[torch.tensor(keep)] = torch.arange(len(keep))
    parts = []
    for name, split in splits.items():
        mask = lookup[split.labels] >= 0
        if not bool(mask.any()):
            raise ConfigError(f"data.classes={keep}: the {name} split has none of them")
        digest = hashlib.sha256(f"{split.fingerprint}{keep}".encode()).hexdigest()[:16]
        parts.append(Split(split.images[mask], lookup[split.labels[mask]], digest))
    train, val, test = parts
    return replace(
        splits,
        train=train,
        val=val,
        test=test,
        classes=[splits.classes[i] for i in keep],
        fingerprint=hashlib.sha256(f"{splits.fingerprint}{keep}".encode()).hexdigest()[:16],
        _stats={},
    )


def channel_stats(images: torch.Tensor) -> tuple[list[float], list[float]]:
    """Exact per-channel mean and standard deviation of uint8 images, in pixel units (0-255),
    from a 256-bin histogram per channel (no float copy of the dataset); of float data
    (sequences and volumes from arrays), in float64, channel by channel."""
    if images.dtype != torch.uint8:
        channels = images.transpose(0, 1).reshape(images.shape[1], -1).double()
        means = channels.mean(1)
        stds = channels.std(1) if channels.shape[1] > 1 else torch.zeros_like(means)
        return means.tolist(), stds.tolist()
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
