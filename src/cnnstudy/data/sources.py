"""Where images come from: the bundled digits, torchvision's datasets, the user's image folders.

Each source returns a `Decoded`: every image brought to the configured channels x
height x width as uint8, with labels, the official test split where the dataset
has one, and a record of what was read. Decoding happens once; splits.py caches it.
"""

from __future__ import annotations

import math
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


# ---------------------------------------------------------------------------- sequences


def _mnist_digits(data: Any) -> Decoded:
    """MNIST's 28x28 digits from data.root, as data=mnist reads them (unpadded): what the
    sequence and clip sources are made from."""
    from omegaconf import OmegaConf

    return torchvision_dataset(
        OmegaConf.merge(
            data,
            {
                "name": "mnist",
                "length": None,
                "depth": None,
                "height": 28,
                "width": 28,
                "channels": 1,
                "fit": "pad",
            },
        )
    )


def sequential_mnist(data: Any) -> Decoded:
    """MNIST read as sequences (1D): each 28x28 image as 784 steps of one pixel, row after
    row (data.length=784, data.channels=1), or as 28 steps of a row's 28 pixels
    (data.length=28, data.channels=28). The same files, splits and labels as data=mnist."""
    decoded = _mnist_digits(data)

    def rows(images: torch.Tensor) -> torch.Tensor:
        n = images.shape[0]
        if data.channels == 1:
            return images.reshape(n, 1, 28 * 28).contiguous()
        return images.reshape(n, 28, 28).transpose(1, 2).contiguous()  # row t: channels

    decoded.images = rows(decoded.images)
    decoded.test_images = rows(decoded.test_images)
    decoded.source = f"{decoded.source} (as sequences)"
    return decoded


# ---------------------------------------------------------------------------- clips


def _bounce(start: torch.Tensor, step: torch.Tensor, t: int, room: int) -> torch.Tensor:
    """Positions after t steps on a segment [0, room], reflected at both ends."""
    if room == 0:
        return torch.zeros_like(start, dtype=torch.long)
    x = (start + step * t) % (2 * room)
    return torch.where(x > room, 2 * room - x, x).round().long()


def moving_mnist(data: Any) -> Decoded:
    """Moving MNIST (3D clips), as Srivastava et al. (2015) made it: 28x28 MNIST digits
    moving at constant velocities inside a data.height x data.width frame for data.depth
    frames, bouncing off the edges, overlaid by their brighter pixel. With one digit a
    clip (data.digits=1) the class is the digit; with two, the pair in either order (55
    classes, "3+7"). data.clips training clips from MNIST's training digits and a sixth as
    many test clips from its test digits, drawn from data.clip_seed: the same seed, the
    same clips (then cached)."""
    digits = _mnist_digits(data)
    generator = torch.Generator().manual_seed(int(data.clip_seed))
    frames, height, width = int(data.depth), int(data.height), int(data.width)
    per = int(data.get("digits", 1))

    def moving(images: torch.Tensor, n: int, out: torch.Tensor) -> torch.Tensor:
        """One digit more in each of the n clips `out`; the digits' indices."""
        pick = torch.randint(len(images), (n,), generator=generator)
        rooms = (height - 28, width - 28)
        starts = [torch.rand(n, generator=generator, dtype=torch.float64) * r for r in rooms]
        angle = torch.rand(n, generator=generator, dtype=torch.float64) * 2 * torch.pi
        speed = 1 + 2 * torch.rand(n, generator=generator, dtype=torch.float64)  # px a frame
        steps = (speed * torch.sin(angle), speed * torch.cos(angle))
        for t in range(frames):
            ys = _bounce(starts[0], steps[0], t, rooms[0]).tolist()
            xs = _bounce(starts[1], steps[1], t, rooms[1]).tolist()
            for i, (y, x) in enumerate(zip(ys, xs, strict=True)):
                window = out[i, 0, t, y : y + 28, x : x + 28]
                torch.maximum(window, images[pick[i], 0], out=window)
        return pick

    def clips(images: torch.Tensor, labels: torch.Tensor, n: int):
        out = torch.zeros(n, 1, frames, height, width, dtype=torch.uint8)
        picks = [moving(images, n, out) for _ in range(per)]
        if per == 1:
            return out, labels[picks[0]]
        low, high = torch.stack([labels[p] for p in picks], 1).sort(1).values.unbind(1)
        return out, 10 * low - low * (low - 1) // 2 + (high - low)  # the pair's index

    train, train_labels = clips(digits.images, digits.labels, int(data.clips))
    test, test_labels = clips(digits.test_images, digits.test_labels, max(1, int(data.clips) // 6))
    classes = digits.classes
    if per == 2:
        classes = [f"{a}+{b}" for a in range(10) for b in range(a, 10)]
    return Decoded(
        train,
        train_labels,
        classes,
        test,
        test_labels,
        source=f"{digits.source} ({per} moving in {frames} frames of {height}x{width}, "
        f"seed {data.clip_seed})",
    )


# ---------------------------------------------------------------------------- arrays


def npz(data: Any) -> Decoded:
    """The user's own sequences, images, volumes or clips from a .npz file (numpy.savez):
    x_train, y_train, and x_test, y_test where the data has its own test split; an
    optional `classes` array names the classes. x holds N samples of C channels by the
    axes (N x C x L, N x C x H x W, N x C x D x H x W), or without the channel axis for
    one channel. Values are kept as float32. What does not match the config is said with
    the array's shape and the keys to set."""
    import numpy as np

    from cnnstudy.data.files import npz_file
    from cnnstudy.network.plan import AXES, dims_of, input_size

    path = npz_file(data)
    try:
        arrays = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise ConfigError(f"data.path={path}: numpy cannot read it ({err})") from None
    with arrays:
        names = set(arrays.files)
        for needed in ("x_train", "y_train"):
            if needed not in names:
                raise ConfigError(
                    f"data.path={path}: no array {needed} (it holds: "
                    f"{', '.join(sorted(names)) or 'nothing'}); save x_train, y_train and "
                    "optionally x_test, y_test, classes"
                )
        if ("x_test" in names) != ("y_test" in names):
            raise ConfigError(f"data.path={path}: x_test and y_test come together, or neither")
        dims = dims_of(data)
        size = input_size(data)
        axes = dict(zip(AXES[dims], size, strict=True))
        keys = {"L": "length", "D": "depth", "H": "height", "W": "width"}

        def samples(name: str) -> torch.Tensor:
            try:
                x = arrays[name]
            except ValueError as err:  # an object array: sequences of unequal lengths
                raise ConfigError(
                    f"data.path={path}: {name} is not one rectangular array ({err}); sequences "
                    "of unequal lengths are not padded by cnnstudy: pad or cut them to one "
                    "length first (numpy.pad), and set data.length to it"
                ) from None
            if x.ndim == dims + 1:
                x = x[:, None]
            want = (data.channels, *size)
            if x.ndim != dims + 2 or tuple(x.shape[1:]) != want:
                said = " ".join(f"data.{keys[a]}={n}" for a, n in axes.items())
                fix = (
                    "set data.channels="
                    + " data.".join(
                        [str(x.shape[1])]
                        + [f"{keys[a]}={n}" for a, n in zip(axes, x.shape[2:], strict=True)]
                    )
                    if x.ndim == dims + 2
                    else f"its {x.ndim - 1} axes after the samples' do not make a {dims}D "
                    "input: say the data's axes (data.length for sequences; data.depth, "
                    "data.height, data.width for volumes)"
                )
                raise ConfigError(
                    f"data.path={path}: {name} has shape {list(x.shape)}; the config expects "
                    f"N x {' x '.join(map(str, want))} (data.channels={data.channels} {said}): "
                    f"{fix}"
                )
            if not np.issubdtype(x.dtype, np.number):
                raise ConfigError(f"data.path={path}: {name} holds {x.dtype}, not numbers")
            x = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
            if not bool(torch.isfinite(x).all()):
                bad = int((~torch.isfinite(x)).flatten(1).any(1).nonzero()[0, 0])
                raise ConfigError(
                    f"data.path={path}: {name}[{bad}] holds NaN or infinite values; fill or "
                    "drop those samples first"
                )
            return x

        def labels(name: str, n: int) -> torch.Tensor:
            y = arrays[name]
            if data.task == "regression":
                if y.ndim != 1 or len(y) != n or not np.issubdtype(y.dtype, np.number):
                    raise ConfigError(
                        f"data.path={path}: {name} must be {n} numbers, one target per "
                        f"sample; it has shape {list(y.shape)} and type {y.dtype}"
                    )
                if not np.isfinite(y).all():
                    raise ConfigError(f"data.path={path}: {name} holds NaN or infinite values")
                return torch.from_numpy(y.astype(np.float32))
            if y.ndim != 1 or len(y) != n or not np.issubdtype(y.dtype, np.integer):
                raise ConfigError(
                    f"data.path={path}: {name} must be {n} whole-number class labels, one per "
                    f"sample; it has shape {list(y.shape)} and type {y.dtype}"
                )
            return torch.from_numpy(y.astype(np.int64))

        x_train = samples("x_train")
        y_train = labels("y_train", len(x_train))
        x_test = y_test = None
        if "x_test" in names:
            x_test = samples("x_test")
            y_test = labels("y_test", len(x_test))
        if data.task == "regression":
            return Decoded(x_train, y_train, [], x_test, y_test, source=str(path))
        top = int(max(y_train.max(), y_test.max() if y_test is not None else 0))
        if int(y_train.min()) < 0 or (y_test is not None and int(y_test.min()) < 0):
            raise ConfigError(f"data.path={path}: class labels must be 0 or more")
        count = top + 1
        if "classes" in names:
            classes = [str(c) for c in arrays["classes"]]
            if len(classes) < count:
                raise ConfigError(
                    f"data.path={path}: classes names {len(classes)} classes; the labels go "
                    f"up to {top}"
                )
        else:
            classes = [str(i) for i in range(count)]
    if data.num_classes and data.num_classes != len(classes):
        raise ConfigError(
            f"data.num_classes={data.num_classes}: {path} has {len(classes)} classes; set "
            f"data.num_classes={len(classes)} (or 0: counted from the file)"
        )
    return Decoded(x_train, y_train, classes, x_test, y_test, source=str(path))


def csv_series(data: Any) -> Decoded:
    """Series from CSV or TSV files, one a row, its class label in the first field: the
    UCR archive's own format (GunPoint_TRAIN.tsv, GunPoint_TEST.tsv). data.path holds the
    training series, data.test_path the test series (else data.test_fraction is held out).
    Labels are names: sorted (numerically where all are numbers), they become classes
    0..K-1. Rows of another length, empty or non-numeric values are one line naming the
    file, the row and what to do."""
    from cnnstudy.data.files import csv_labels, csv_rows

    files = [data.path] + ([data.test_path] if data.test_path else [])
    labels: set[str] = set()
    for file in files:
        labels |= csv_labels(file)
    try:
        names = sorted(labels, key=float)
    except ValueError:
        names = sorted(labels)
    index = {name: i for i, name in enumerate(names)}

    def read(file: str) -> tuple[torch.Tensor, torch.Tensor]:
        rows = csv_rows(file)
        if not rows:
            raise ConfigError(f"data.path={file}: no series in it")
        values = []
        for number, row in enumerate(rows, start=1):
            series = row[1:]
            if len(series) != data.length:
                raise ConfigError(
                    f"data.path={file}: row {number} holds {len(series)} values after its "
                    f"label, data.length={data.length}: series of unequal lengths are not "
                    "padded by cnnstudy; set data.length to the series' length, or pad or "
                    "cut them to one length first"
                )
            try:
                floats = [float(v) for v in series]
            except ValueError:
                bad = next(v for v in series if not _is_float(v))
                raise ConfigError(
                    f"data.path={file}: row {number} holds {bad!r}, not a number (a missing "
                    "value?); fill or drop that row first"
                ) from None
            if any(math.isnan(v) or math.isinf(v) for v in floats):
                raise ConfigError(
                    f"data.path={file}: row {number} holds NaN or infinite values; fill or "
                    "drop that row first"
                )
            values.append(floats)
        x = torch.tensor(values, dtype=torch.float32).unsqueeze(1)
        y = torch.tensor([index[row[0].strip()] for row in rows], dtype=torch.long)
        return x, y

    x, y = read(data.path)
    x_test = y_test = None
    if data.test_path:
        x_test, y_test = read(data.test_path)
    if data.num_classes and data.num_classes != len(names):
        raise ConfigError(
            f"data.num_classes={data.num_classes}: the files have {len(names)} classes "
            f"({', '.join(names[:10])}); set data.num_classes={len(names)} or 0"
        )
    return Decoded(x, y, names, x_test, y_test, source=" + ".join(str(f) for f in files))


def ucr(data: Any) -> Decoded:
    """A UCR/UEA set from the .ts files aeon ships in its wheel (data.problem), or the
    user's own .ts files (data.path, data.test_path), read by aeon's own reader
    (aeon.datasets.load_from_ts_file): N x channels x length float32 series, the set's
    fixed train/test split, classes in the order the file's header lists them, or float
    targets for a regression set. Series shorter than data.length are zero-padded at
    their end (data.unequal=pad; config.check refuses them otherwise)."""
    import warnings

    import numpy as np

    from cnnstudy.data.files import ts_files, ts_summary

    with warnings.catch_warnings():  # numpy's, under torch's flush-to-zero: harmless
        warnings.filterwarnings("ignore", message="The value of the smallest subnormal")
        from aeon.datasets import load_from_ts_file

    files = [path for _, path in ts_files(data)]
    classes: list[str] = []
    if data.task != "regression":
        for path in files:
            seen = {c.lower() for c in classes}
            classes += [c for c in ts_summary(path)["classes"] if c.lower() not in seen]
    index = {name.lower(): i for i, name in enumerate(classes)}  # rows may differ in case

    def read(path) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            x, y = load_from_ts_file(str(path))
        except (OSError, ValueError) as err:
            raise ConfigError(f"data: aeon cannot read {path} ({err})") from None
        out = np.zeros((len(x), data.channels, data.length), dtype=np.float32)
        for i, series in enumerate(x):  # a 3D array, or a list of C x L_i arrays
            out[i, :, : series.shape[-1]] = series
        if data.task == "regression":
            return torch.from_numpy(out), torch.from_numpy(np.asarray(y, dtype=np.float32))
        try:
            codes = [index[str(label).strip().lower()] for label in y]
        except KeyError as err:
            raise ConfigError(
                f"data: {path} holds the label {err}, which its @classLabel line does not list"
            ) from None
        labels = torch.tensor(codes, dtype=torch.long)
        return torch.from_numpy(out), labels

    x, y = read(files[0])
    x_test = y_test = None
    if len(files) > 1:
        x_test, y_test = read(files[1])
    source = f"aeon: {data.problem}" if not data.path else " + ".join(map(str, files))
    return Decoded(x, y, classes, x_test, y_test, source=source)


def medmnist(data: Any) -> Decoded:
    """A MedMNIST 3D set (Yang et al. 2023) through the medmnist package: data.problem's
    volumes (28 or 64 a side) from data.root, downloaded by medmnist's own code where
    data.download is set (the file missing and no internet: a ConfigError naming the
    file, its URL and where to put it, within seconds). Its train and val splits make the
    training pool (data.val_fraction is held out of it); its test split is the test split."""
    import numpy as np

    from cnnstudy.data.files import medmnist_file, medmnist_info, medmnist_missing

    path = medmnist_file(data)
    info = medmnist_info(data.problem)
    if not path.is_file():
        import warnings

        with warnings.catch_warnings():  # numpy's, under torch's flush-to-zero: harmless
            warnings.filterwarnings("ignore", message="The value of the smallest subnormal")
            import medmnist as package

        path.parent.mkdir(parents=True, exist_ok=True)
        saved_timeout = socket.getdefaulttimeout()
        socket.setdefaulttimeout(20)  # an unreachable mirror fails in seconds, not minutes
        try:
            getattr(package, info["python_class"])(
                split="test", root=str(path.parent), size=int(data.depth), download=True
            )
        except (OSError, RuntimeError) as err:
            cause = err.__context__ or err  # medmnist re-raises the network's error as its own
            reason = str(cause).strip().splitlines()[-1] if str(cause).strip() else ""
            reason = reason or type(cause).__name__
            raise ConfigError(medmnist_missing(data, f"download failed ({reason})")) from None
        finally:
            socket.setdefaulttimeout(saved_timeout)
    try:
        with np.load(path) as arrays:
            parts = {k: arrays[k] for k in arrays.files}
    except (OSError, ValueError) as err:
        raise ConfigError(medmnist_missing(data, f"numpy cannot read {path} ({err})")) from None

    def tensors(*splits: str) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            x = np.concatenate([parts[f"{s}_images"] for s in splits])
            y = np.concatenate([parts[f"{s}_labels"] for s in splits]).reshape(len(x), -1)
        except KeyError as err:
            raise ConfigError(medmnist_missing(data, f"{path} lacks {err}")) from None
        x = torch.from_numpy(np.ascontiguousarray(x)).unsqueeze(1)
        return (x if x.dtype == torch.uint8 else x.float()), torch.from_numpy(y[:, 0]).long()

    images, labels = tensors("train", "val")
    test_images, test_labels = tensors("test")
    classes = [info["label"][str(i)] for i in range(len(info["label"]))]
    return Decoded(images, labels, classes, test_images, test_labels, source=str(path))


def _is_float(value: str) -> bool:
    try:
        float(value)
    except ValueError:
        return False
    return True


SOURCES = {
    "digits": digits,
    "folder": folder,
    **{name: torchvision_dataset for name in TORCHVISION},
    "sequential_mnist": sequential_mnist,
    "moving_mnist": moving_mnist,
    "npz": npz,
    "csv": csv_series,
    "ucr": ucr,
    "medmnist": medmnist,
}
