"""Where data lives on disk: the files torchvision's datasets read, and image folders in
ImageFolder's layout (one subfolder per class). Plain Python: config checks and describe
use it without importing torch."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cnnstudy.errors import ConfigError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def _images_in(folder: Path) -> Iterator[Path]:
    for root, _, names in os.walk(folder, followlinks=True):
        for name in sorted(names):
            if name.lower().endswith(IMAGE_SUFFIXES):
                yield Path(root) / name


def class_folders(path: Path) -> list[Path]:
    """The class subfolders, sorted; a ConfigError when there are fewer than 2 or one is empty."""
    path = path.expanduser().resolve()
    if not path.is_dir():
        raise ConfigError(
            f"data.path={path}: not a folder; give a folder with one subfolder of images per class"
        )
    folders = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(folders) < 2:
        names = ", ".join(p.name for p in folders) or "none"
        raise ConfigError(
            f"data.path={path}: {len(folders)} class folder(s) found ({names}); a classifier "
            "needs at least 2, one subfolder per class holding its images"
        )
    empty = [p.name for p in folders if next(_images_in(p), None) is None]
    if empty:
        raise ConfigError(
            f"data.path={path}: class folder(s) with no images: {', '.join(empty)} "
            f"(image files end in {', '.join(IMAGE_SUFFIXES)}); remove them or add images"
        )
    return folders


def image_files(path: Path) -> list[tuple[Path, int]]:
    """(file, class index) for every image file under the class folders, in a stable order."""
    return [
        (file, label)
        for label, folder in enumerate(class_folders(path))
        for file in sorted(_images_in(folder))
    ]


def count_classes(path: Path) -> int:
    return len(class_folders(path))


# ---------------------------------------------------------------------------- torchvision

_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
# name -> (torchvision class, folder under data.root, files torchvision reads there)
TORCHVISION = {
    "mnist": ("MNIST", "MNIST/raw", _MNIST_FILES),
    "fashion_mnist": ("FashionMNIST", "FashionMNIST/raw", _MNIST_FILES),
    "kmnist": ("KMNIST", "KMNIST/raw", _MNIST_FILES),
    "sequential_mnist": ("MNIST", "MNIST/raw", _MNIST_FILES),  # MNIST's files, read as sequences
    "moving_mnist": ("MNIST", "MNIST/raw", _MNIST_FILES),  # MNIST's digits, moving in clips
    "cifar10": (
        "CIFAR10",
        "cifar-10-batches-py",
        (
            "data_batch_1",
            "data_batch_2",
            "data_batch_3",
            "data_batch_4",
            "data_batch_5",
            "test_batch",
            "batches.meta",
        ),
    ),
}


def expected_files(data: Any) -> list[Path]:
    _, folder, files = TORCHVISION[data.name]
    return [Path(data.root).expanduser().resolve() / folder / name for name in files]


def missing_message(data: Any, why: str) -> str:
    files = expected_files(data)
    remedy = (
        "check the connection, or download them elsewhere and copy them there"
        if data.download
        else "or set data.download=true where the internet is reachable"
    )
    return (
        f"data={data.name}: {why}. Expected in {files[0].parent}: "
        f"{', '.join(f.name for f in files)}. Put them there (data.root={data.root} is the "
        f"folder above), point data.root at the folder that holds them, {remedy}."
    )


def idx_problem(path: Path) -> str | None:
    """Why an IDX file (MNIST's format) is not whole, or None: its header gives the
    dimensions, so its exact size is known before anything decodes it."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(4)
        if len(head) < 4 or head[:2] != b"\0\0" or head[2] not in _IDX_ITEM:
            return f"{size} bytes, not an IDX file (it starts with {head.hex() or 'nothing'})"
        dims = f.read(4 * head[3])
    if len(dims) < 4 * head[3]:
        return f"{size} bytes, shorter than its own header"
    count = _IDX_ITEM[head[2]]
    for i in range(head[3]):
        count *= int.from_bytes(dims[4 * i : 4 * i + 4], "big")
    expected = 4 + 4 * head[3] + count
    if size != expected:
        return f"{size:,} bytes where its header promises {expected:,}"
    return None


_IDX_ITEM = {0x08: 1, 0x09: 1, 0x0B: 2, 0x0C: 4, 0x0D: 4, 0x0E: 8}  # type code -> bytes


def check_files(data: Any) -> None:
    """Before anything heavy: the files a dataset needs are there and whole (IDX files by
    their headers), or will be downloaded."""
    if data.name in TORCHVISION and not data.download:
        files = expected_files(data)
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise ConfigError(missing_message(data, f"{len(missing)} file(s) missing"))
        if TORCHVISION[data.name][2] == _MNIST_FILES:
            for file in files:
                problem = idx_problem(file)
                if problem:
                    raise ConfigError(
                        f"data={data.name}: {file} is damaged: {problem}. Replace it with the "
                        f"published file (torchvision's {TORCHVISION[data.name][0]} mirrors; "
                        f"MNIST's SHA256SUMS name each file's checksum), or delete it and run "
                        "once with data.download=true where the internet is reachable"
                    )
    elif data.name == "folder":
        class_folders(Path(data.path))
    elif data.name == "npz":
        npz_file(data)
    elif data.name == "ucr":
        ts_files(data)
    elif data.name == "medmnist" and not data.download:
        if not medmnist_file(data).is_file():
            raise ConfigError(medmnist_missing(data, "the file is missing"))
    elif data.name == "csv":
        for key in ("path", "test_path"):
            if data[key] and not Path(data[key]).expanduser().is_file():
                raise ConfigError(
                    f"data.{key}={data[key]}: no such file; data=csv reads one series a row, "
                    "its class label first (the UCR archive's _TRAIN.tsv / _TEST.tsv)"
                )


def npz_file(data: Any) -> Path:
    """data=npz: the file, there and a zip archive (numpy's .npz), or a ConfigError."""
    path = Path(data.path).expanduser().resolve() if data.path else None
    if path is None or not path.is_file():
        raise ConfigError(
            f"data.path={data.path or '(empty)'}: data=npz needs a .npz file holding x_train "
            "and y_train (and x_test, y_test where the data has its own test split); see the "
            "README, Data: arrays"
        )
    with path.open("rb") as f:
        if f.read(4) != b"PK\x03\x04":
            raise ConfigError(
                f"data.path={path}: not a .npz file (numpy.savez writes a zip archive); "
                "save the arrays with numpy.savez(path, x_train=..., y_train=...)"
            )
    return path


def csv_rows(path: str | Path) -> list[list[str]]:
    """The rows of a CSV or TSV file of series (tab-separated where the file has tabs),
    blank lines left out; a ConfigError when it cannot be read."""
    import csv

    path = Path(path).expanduser().resolve()
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"data.path={path}: cannot read it as text ({err})") from None
    delimiter = "\t" if "\t" in text.split("\n", 1)[0] else ","
    return [row for row in csv.reader(text.splitlines(), delimiter=delimiter) if row]


def csv_labels(path: str | Path) -> set[str]:
    """The class labels of a CSV of series: each row's first field."""
    return {row[0].strip() for row in csv_rows(path)}


def count_npz_classes(data: Any) -> int:
    """data=npz, data.num_classes=0: the classes the file names, else the largest label + 1."""
    import numpy as np

    path = npz_file(data)
    try:
        with np.load(path, allow_pickle=False) as arrays:
            if "classes" in arrays.files:
                return len(arrays["classes"])
            top = max(int(arrays[y].max()) for y in ("y_train", "y_test") if y in arrays.files)
    except (OSError, ValueError, KeyError) as err:
        raise ConfigError(f"data.path={path}: cannot count its classes ({err})") from None
    return top + 1


def file_identity(data: Any) -> list[tuple[str, int, int]]:
    """(path, size, whole-second mtime) of every file a dataset is read from: what the
    decoded-data cache key checks for changes. Missing files count as size -1."""
    if data.name in TORCHVISION:
        files = expected_files(data)
    elif data.name == "folder":
        files = [file for file, _ in image_files(Path(data.path))]
    elif data.name == "npz":
        files = [Path(data.path).expanduser().resolve()]
    elif data.name == "csv":
        files = [Path(p).expanduser().resolve() for p in (data.path, data.test_path) if p]
    elif data.name == "ucr":
        files = [path for _, path in ts_files(data)]
    elif data.name == "medmnist":
        files = [medmnist_file(data)]
    else:
        files = []
    identity = []
    for file in files:
        try:
            st = file.stat()
            identity.append((str(file), st.st_size, int(st.st_mtime)))
        except OSError:
            identity.append((str(file), -1, -1))
    return identity


# ---------------------------------------------------------------------------- .ts series


def aeon_data_folder() -> Path:
    """The folder of UCR/UEA sets inside aeon's wheel, found without importing aeon."""
    import importlib.util

    spec = importlib.util.find_spec("aeon")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "data=ucr: the aeon package is not installed; its wheel ships the UCR/UEA sets "
            "(pip install aeon), or give your own files: data.path=X_TRAIN.ts"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"


def ucr_problems() -> dict[str, Path]:
    """The sets aeon ships with both a _TRAIN.ts and a _TEST.ts file: name -> folder."""
    found = {}
    for train in sorted(aeon_data_folder().glob("*/*_TRAIN.ts")):
        name = train.name.removesuffix("_TRAIN.ts")
        if train.parent.name != "UnitTest" and train.with_name(f"{name}_TEST.ts").is_file():
            found[name] = train.parent
    return found


def ts_files(data: Any) -> list[tuple[str, Path]]:
    """data=ucr: (key, path) of the .ts files read: data.path (and data.test_path), else
    the set data.problem's _TRAIN.ts and _TEST.ts from aeon's wheel; or a ConfigError."""
    if data.test_path and not data.path:
        raise ConfigError(
            f"data.test_path={data.test_path}: a test file needs its training file too "
            "(data.path=X_TRAIN.ts); or data.test_path='' for the set data.problem names"
        )
    if data.path:
        found = []
        for key in ("path", "test_path"):
            if data[key]:
                path = Path(data[key]).expanduser().resolve()
                if not path.is_file():
                    raise ConfigError(
                        f"data.{key}={data[key]}: no such file; data=ucr reads the UCR/UEA "
                        "archives' .ts format (README, Data: series)"
                    )
                found.append((key, path))
        return found
    problems = ucr_problems()
    if data.problem not in problems:
        raise ConfigError(
            f"data.problem={data.problem}: not a set aeon ships; valid: "
            f"{', '.join(problems)}; or your own: data.path=X_TRAIN.ts data.test_path=X_TEST.ts"
        )
    folder = problems[data.problem]
    return [
        ("problem", folder / f"{data.problem}_TRAIN.ts"),
        ("problem", folder / f"{data.problem}_TEST.ts"),
    ]


_ts_memo: dict[tuple, dict[str, Any]] = {}


def ts_summary(path: Path) -> dict[str, Any]:
    """What a .ts file holds, read without parsing its numbers: channels, the shortest
    and longest series, the class names its header lists (in order) or that its rows
    carry, whether it is a regression set (@targetLabel), the number of series, and
    whether any value is missing ('?'). A ConfigError names what cannot be read."""
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key in _ts_memo:
        return _ts_memo[key]
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"data: cannot read {path} as text ({err})") from None
    header: dict[str, list[str]] = {}
    rows = None
    lines = text.splitlines()
    for number, line in enumerate(lines):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.lower() == "@data":
            rows = [r for r in lines[number + 1 :] if r.strip() and not r.startswith("#")]
            break
        if line.startswith("@"):
            name, *values = line.split()
            header[name.lower()] = values
    if rows is None:
        raise ConfigError(f"data: {path} is not a .ts file (no @data line)")
    if header.get("@timestamps", ["false"])[0].lower() == "true":
        raise ConfigError(f"data: {path} has time stamps (@timeStamps true): not read here")
    regression = header.get("@targetlabel", ["false"])[0].lower() == "true"
    listed = header.get("@classlabel", ["false"])
    if not regression and listed[0].lower() != "true":
        raise ConfigError(
            f"data: {path} has no labels (neither @classLabel true nor @targetLabel true): "
            "cnnstudy trains on labelled series"
        )
    channels, shortest, longest, labels, missing = set(), None, 0, set(), False
    for number, row in enumerate(rows, start=1):
        *dims, label = row.strip().split(":")
        channels.add(len(dims))
        steps = {dim.count(",") + 1 for dim in dims}
        if len(steps) > 1:
            raise ConfigError(
                f"data: {path}: series {number} has channels of {sorted(steps)} steps; every "
                "channel of a series must have the same length"
            )
        for n in steps:
            shortest = n if shortest is None else min(shortest, n)
            longest = max(longest, n)
        labels.add(label.strip())
        missing = missing or "?" in row or "NaN" in row
    if shortest != longest and header.get("@equallength", ["false"])[0].lower() == "true":
        raise ConfigError(
            f"data: {path} says @equalLength true, but its series run from {shortest} to "
            f"{longest} steps; correct the header (@equalLength false) or the series"
        )
    if len(channels) != 1:
        raise ConfigError(
            f"data: {path}: its series have {sorted(channels)} channels; one number for all"
        )
    if listed[0].lower() == "true":
        classes = listed[1:]
        lowered = [c.lower() for c in classes]
        if len(set(lowered)) != len(lowered):
            raise ConfigError(
                f"data: {path}: class names that differ only in case ({', '.join(classes)}): "
                "aeon reads labels in lower case, so they would be one class; rename them"
            )
        unlisted = {label.lower() for label in labels} - {c.lower() for c in classes}
        if unlisted:
            raise ConfigError(
                f"data: {path}: rows carry class labels its @classLabel line does not list "
                f"({', '.join(sorted(unlisted)[:5])}); list every class there"
            )
    elif regression:
        classes = None
    else:
        classes = sorted(labels, key=float) if all(map(_is_number, labels)) else sorted(labels)
    summary = {
        "channels": channels.pop(),
        "shortest": shortest,
        "longest": longest,
        "classes": classes,
        "regression": regression,
        "count": len(rows),
        "missing": missing,
    }
    _ts_memo[key] = summary
    return summary


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


# ---------------------------------------------------------------------------- MedMNIST


MEDMNIST_3D = (
    "organmnist3d",
    "nodulemnist3d",
    "adrenalmnist3d",
    "fracturemnist3d",
    "vesselmnist3d",
    "synapsemnist3d",
)
_medmnist_info: dict[str, Any] = {}


def medmnist_info(flag: str) -> dict[str, Any]:
    """medmnist's own INFO entry for a set (classes, URL, MD5, sizes), read from its
    info.py as data: neither that module (which makes ~/.medmnist when it runs) nor the
    package (which imports torch) is imported."""
    if not _medmnist_info:
        import ast
        import importlib.util

        spec = importlib.util.find_spec("medmnist")
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(
                "data=medmnist: the medmnist package is not installed (pip install medmnist)"
            )
        path = Path(list(spec.submodule_search_locations)[0]) / "info.py"
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Assign) and any(
                getattr(target, "id", None) == "INFO" for target in node.targets
            ):
                _medmnist_info.update(ast.literal_eval(node.value))
        if not _medmnist_info:
            raise ConfigError(f"data=medmnist: no INFO table in {path}: another medmnist version?")
    return _medmnist_info[flag]


def medmnist_file(data: Any) -> Path:
    """data=medmnist: the .npz file medmnist reads and downloads: data.root/FLAG.npz for
    28x28x28 volumes, FLAG_64.npz for 64x64x64."""
    suffix = "" if data.depth == 28 else f"_{data.depth}"
    return Path(data.root).expanduser().resolve() / f"{data.problem}{suffix}.npz"


def medmnist_missing(data: Any, why: str) -> str:
    path = medmnist_file(data)
    info = medmnist_info(data.problem)
    suffix = "" if data.depth == 28 else f"_{data.depth}"
    remedy = (
        "check the connection, or download it elsewhere and copy it there"
        if data.download
        else "or set data.download=true where the internet is reachable (medmnist downloads it)"
    )
    return (
        f"data=medmnist: {why}. Expected: {path} (data.root={data.root}). Download "
        f"{info['url' + suffix]} (MD5 {info['MD5' + suffix]}) and put it there, point "
        f"data.root at the folder that holds it, {remedy}."
    )
