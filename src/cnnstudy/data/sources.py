"""Where images come from: the bundled digits, torchvision's datasets, the user's image folders.

Each source returns a `Decoded`: every image brought to the configured channels x
height x width as uint8, with labels, the official test split where the dataset
has one, and a record of what was read. Decoding happens once; splits.py caches it.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from cnnstudy.data.files import (
    TORCHVISION,
    class_folders,
    expected_files,
    image_files,
    missing_message,
)
from cnnstudy.errors import ConfigError


@dataclass
class Decoded:
    images: (
        torch.Tensor
    )  # uint8, N x C x H x W: the training pool (or everything, without a test split)
    labels: torch.Tensor  # int64, N
    classes: list[str]
    test_images: torch.Tensor | None = None  # the dataset's own test split, where it has one
    test_labels: torch.Tensor | None = None
    source: str = ""  # where it came from, for MLflow's dataset inputs
    skipped: list[str] = field(default_factory=list)  # unreadable files left out, "path: reason"


# ---------------------------------------------------------------------------- fitting


def fit(images: torch.Tensor, data: Any) -> torch.Tensor:
    """Float or uint8 images N x C x h x w (0-255) brought to data's channels x height x width.

    data.fit: "resize" stretches to height x width; "pad" centres the image on a zero
    canvas (cropping the centre where it is larger); "resize_pad" scales it to fit
    inside, keeping its aspect ratio, then pads.
    """
    images = images.float()
    channels, height, width = data.channels, data.height, data.width
    if images.shape[1] != channels:
        if images.shape[1] == 1:
            images = images.expand(-1, channels, -1, -1)
        elif channels == 1:  # ITU-R 601 luma, as PIL's convert("L")
            weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
            images = (images[:, :3] * weights).sum(1, keepdim=True)
        else:
            raise ConfigError(
                f"data.channels={channels}: the images have {images.shape[1]} channels; use 1 or 3"
            )
    h, w = images.shape[-2:]
    if (h, w) != (height, width):
        if data.fit == "resize":
            images = _resize(images, height, width)
        elif data.fit == "resize_pad":
            scale = min(height / h, width / w)
            images = _resize(images, max(1, round(h * scale)), max(1, round(w * scale)))
            images = _pad_or_crop(images, height, width)
        else:
            images = _pad_or_crop(images, height, width)
    return images.round().clamp_(0, 255).to(torch.uint8).contiguous()


def _resize(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    antialias = height < images.shape[-2] or width < images.shape[-1]
    return F.interpolate(
        images, size=(height, width), mode="bilinear", align_corners=False, antialias=antialias
    )


def _pad_or_crop(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    h, w = images.shape[-2:]
    top, left = (height - h) // 2, (width - w) // 2  # negative: crop
    return F.pad(images, (left, width - w - left, top, height - h - top))


# ---------------------------------------------------------------------------- digits


def digits(data: Any) -> Decoded:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy(bunch.images).float().unsqueeze(1) * (255.0 / 16.0)
    return Decoded(
        fit(images, data),
        torch.from_numpy(bunch.target).long(),
        [str(i) for i in range(10)],
        source="sklearn.datasets.load_digits",
    )


# ---------------------------------------------------------------------------- torchvision


def torchvision_dataset(data: Any) -> Decoded:
    missing = [f for f in expected_files(data) if not f.is_file()]
    if missing and not data.download:
        raise ConfigError(missing_message(data, f"{len(missing)} file(s) missing"))
    from torchvision import datasets

    cls = getattr(datasets, TORCHVISION[data.name][0])
    root = str(Path(data.root).expanduser())
    saved_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(20)  # an unreachable mirror fails in seconds, not minutes
    try:
        train = cls(root, train=True, download=bool(missing))
        test = cls(root, train=False, download=False)
    except (OSError, RuntimeError) as err:  # URLError is an OSError
        reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        what = "download failed" if missing else "reading the files failed"
        raise ConfigError(missing_message(data, f"{what} ({reason})")) from None
    finally:
        socket.setdefaulttimeout(saved_timeout)

    def tensors(ds) -> tuple[torch.Tensor, torch.Tensor]:
        images = torch.as_tensor(ds.data)
        images = images.unsqueeze(1) if images.ndim == 3 else images.permute(0, 3, 1, 2)
        return fit(images, data), torch.as_tensor(ds.targets, dtype=torch.long)

    images, labels = tensors(train)
    test_images, test_labels = tensors(test)
    return Decoded(
        images,
        labels,
        [str(c) for c in train.classes],
        test_images,
        test_labels,
        source=str(expected_files(data)[0].parent),
    )


# ---------------------------------------------------------------------------- image folders


def _decode(file: Path, mode: str) -> torch.Tensor:
    from PIL import Image

    with Image.open(file) as img:
        img.load()  # raises on truncated data; LOAD_TRUNCATED_IMAGES stays False
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            img = img.convert("RGBA")
            canvas = Image.new("RGBA", img.size, (0, 0, 0, 255))
            img = Image.alpha_composite(canvas, img)  # transparent pixels become background (0)
        img = img.convert(mode)
        array = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
        return array.view(img.size[1], img.size[0], len(mode)).permute(2, 0, 1)


def folder(data: Any) -> Decoded:
    from PIL import UnidentifiedImageError

    path = Path(data.path).expanduser().resolve()
    files = image_files(path)
    classes = [p.name for p in class_folders(path)]
    mode = "L" if data.channels == 1 else "RGB"
    images, labels, skipped = [], [], []
    for file, label in files:
        try:
            image = _decode(file, mode)
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as err:
            skipped.append(f"{file}: {err}")
            continue
        images.append(fit(image.unsqueeze(0), data))
        labels.append(label)
    if skipped and data.bad_images == "error":
        listed = "; ".join(skipped[:5]) + (
            f"; and {len(skipped) - 5} more" if len(skipped) > 5 else ""
        )
        raise ConfigError(
            f"data.path={path}: {len(skipped)} unreadable image file(s): {listed}. Fix or remove "
            "them, or set data.bad_images=skip to leave them out (they are listed in the run)"
        )
    counts = torch.bincount(torch.tensor(labels, dtype=torch.long), minlength=len(classes))
    empty = [classes[i] for i in range(len(classes)) if counts[i] == 0]
    if empty:
        raise ConfigError(
            f"data.path={path}: no readable images left in class folder(s): {', '.join(empty)}"
        )
    return Decoded(
        torch.cat(images),
        torch.tensor(labels, dtype=torch.long),
        classes,
        source=str(path),
        skipped=skipped,
    )


SOURCES = {
    "digits": digits,
    "folder": folder,
    **{name: torchvision_dataset for name in TORCHVISION},
}
