"""Small datasets made by the tests themselves: IDX files in torchvision's MNIST layout and
image folders with mixed sizes and modes, a corrupt file and a truncated one."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np
from PIL import Image


def write_idx(
    root: Path, folder: str = "MNIST", n_train: int = 300, n_test: int = 100, seed: int = 0
) -> Path:
    """MNIST-format files under root/folder/raw: 28x28 images whose bright bar's position
    gives the class, so a network can learn them."""
    rng = np.random.default_rng(seed)
    raw = root / folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = rng.integers(0, 40, (n, 28, 28)).astype(np.uint8)
        for i, label in enumerate(labels):
            images[i, 2 + 2 * label : 4 + 2 * label, 4:24] = 250
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(
            struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes()
        )
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(
            struct.pack(">II", 2049, n) + labels.tobytes()
        )
    return raw


def _encoded(img: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt)
    return buffer.getvalue()


def write_folder(root: Path, per_class: int = 6, bad: bool = True) -> dict[str, Path]:
    """root/{circle,square,stripe}/...: mixed sizes and modes (L, RGB, RGBA, P), plus a
    corrupt PNG and a truncated JPEG when `bad`. Returns the bad files by kind."""
    rng = np.random.default_rng(1)
    kinds = ("L", "RGB", "RGBA", "P")
    sizes = ((20, 30), (40, 40), (64, 48), (28, 28))
    for c, name in enumerate(("circle", "square", "stripe")):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            w, h = sizes[i % len(sizes)]
            array = rng.integers(0, 60, (h, w, 3)).astype(np.uint8)
            array[h // 4 : 3 * h // 4, (c * w) // 3 : ((c + 1) * w) // 3] = 240
            img = Image.fromarray(array, "RGB")
            mode = kinds[i % len(kinds)]
            if mode == "RGBA":
                img = img.convert("RGBA")
            elif mode != "RGB":
                img = img.convert(mode)
            fmt = "JPEG" if mode == "RGB" else ("GIF" if mode == "P" else "PNG")
            suffix = {"JPEG": ".jpg", "GIF": ".gif", "PNG": ".png"}[fmt]
            (folder / f"{name}_{i}{suffix}").write_bytes(_encoded(img, fmt))
    bad_files: dict[str, Path] = {}
    if bad:
        corrupt = root / "circle" / "corrupt.png"
        corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + rng.bytes(200))
        whole = _encoded(
            Image.fromarray(rng.integers(0, 255, (50, 50, 3)).astype(np.uint8)), "JPEG"
        )
        truncated = root / "square" / "truncated.jpg"
        truncated.write_bytes(whole[: len(whole) // 2])
        bad_files = {"corrupt": corrupt, "truncated": truncated}
    (root / "square" / "notes.txt").write_text("not an image: ignored")
    return bad_files
