"""Checks the types cannot express, then the architecture's arithmetic, before anything runs.

`check(cfg)` raises a ConfigError naming key, value and what is valid, or returns the
shape plan; it never changes `cfg`. `resolve(cfg)` is the copy a run trains from (a
folder's class count filled in, data paths absolute). Plain Python: no torch.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from cnnstudy.config.schema import (
    ACTIVATIONS,
    DATASETS,
    FITS,
    POOLS,
    PRECISIONS,
    TASKS,
    DataConfig,
    LoggerConfig,
    ModelConfig,
    TrainConfig,
    TrainerConfig,
)
from cnnstudy.errors import ConfigError
from cnnstudy.redact import redact


def _fail(key: str, value: Any, why: str) -> None:
    raise ConfigError(f"{key}={_show(value, key)}: {why}")


def _show(value: Any, key: str = "") -> str:
    if isinstance(value, (ListConfig, DictConfig)):
        value = OmegaConf.to_container(value)
    return str(redact(value, key.rsplit(".", 1)[-1]))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _at_least(cfg: DictConfig, section: str, key: str, low: float) -> None:
    value = cfg[section][key]
    if value < low:
        _fail(f"{section}.{key}", value, f"must be at least {low}")


def _share(cfg: DictConfig, section: str, key: str) -> None:
    value = cfg[section][key]
    if not 0.0 <= value < 1.0 or math.isnan(value):
        _fail(f"{section}.{key}", value, "must be a fraction in [0, 1)")


def _limit(cfg: DictConfig, key: str) -> None:
    value = cfg.trainer[key]
    if value is None:
        return
    if not _is_number(value):
        _fail(f"trainer.{key}", value, "must be a number of batches (int), a share (float) or null")
    skip = "training cannot be skipped" if key == "limit_train_batches" else "0 skips the stage"
    low = 1 if key == "limit_train_batches" else 0
    if isinstance(value, float) and not (0.0 < value <= 1.0 if low else 0.0 <= value <= 1.0):
        _fail(f"trainer.{key}", value, f"a share of batches must be in ({low}, 1] ({skip})")
    if isinstance(value, int) and value < low:
        _fail(f"trainer.{key}", value, f"a number of batches must be at least {low} ({skip})")


def _unknown_keys(cfg: DictConfig) -> None:
    """Keys added with `+key=value` slip past the schema's struct check; catch them here."""
    import difflib
    from dataclasses import fields

    sections = {
        "": TrainConfig,
        "model.": ModelConfig,
        "data.": DataConfig,
        "trainer.": TrainerConfig,
        "logger.": LoggerConfig,
    }
    for prefix, schema in sections.items():
        node = OmegaConf.select(cfg, prefix[:-1]) if prefix else cfg
        valid = [f.name for f in fields(schema)]
        for key in node:
            if key not in valid and not (prefix == "" and key == "hydra"):
                close = difflib.get_close_matches(str(key), valid, n=1)
                hint = f"did you mean {prefix}{close[0]}? " if close else ""
                _fail(f"{prefix}{key}", node[key], f"unknown key; {hint}valid: {', '.join(valid)}")


def _one_form(m: DictConfig, scalars: tuple[str, str], explicit: str, per: str, n: int) -> None:
    """Layer sizes come from two scalar keys or from one explicit list, never both: a key
    that cannot take effect is an error naming the key that would win."""
    base, growth = scalars
    given = [k for k in scalars if m[k] is not None]
    if m[explicit] is not None:
        if given:
            _fail(
                f"model.{given[0]}",
                m[given[0]],
                f"cannot take effect: model.{explicit}={_show(m[explicit])} sets every {per}. "
                f"Give one form: model.{base}=null model.{growth}=null with the list, or "
                f"model.{explicit}=null with model.{base} and model.{growth}",
            )
        if len(m[explicit]) != n:
            _fail(f"model.{explicit}", m[explicit], f"needs one count per {per} ({n})")
        if any(not isinstance(v, int) or v < 1 for v in m[explicit]):
            _fail(f"model.{explicit}", m[explicit], "every count must be a whole number >= 1")
        return
    if len(given) < 2:
        missing = [k for k in scalars if m[k] is None][0]
        _fail(
            f"model.{missing}",
            None,
            f"the {per} sizes need model.{base} and model.{growth}, or model.{explicit} (a list)",
        )
    if m[base] < 1:
        _fail(f"model.{base}", m[base], "must be at least 1")
    if not m[growth] > 0:
        _fail(f"model.{growth}", m[growth], "must be positive (2 doubles, 1 keeps, 0.5 halves)")


def _check_model(m: DictConfig, dims: int = 2) -> None:
    if m.activation not in ACTIVATIONS:
        _fail("model.activation", m.activation, f"valid: {', '.join(ACTIVATIONS)}")
    if m.pool not in POOLS:
        _fail("model.pool", m.pool, f"unknown pooling kind; valid: {', '.join(POOLS)}")
    for key in ("stages", "hidden_layers"):
        if m[key] < 0:
            _fail(f"model.{key}", m[key], "must be at least 0")
    if m.convs_per_stage < 1:
        _fail("model.convs_per_stage", m.convs_per_stage, "must be at least 1")
    for key in ("receptive_field", "stride", "pool_size", "pool_stride"):
        _per_axis(m, key, dims, 1)
    _one_form(m, ("filters", "filter_growth"), "filters_per_stage", "stage", m.stages)
    _one_form(
        m,
        ("hidden_units", "hidden_growth"),
        "hidden_units_per_layer",
        "hidden layer",
        m.hidden_layers,
    )
    for key in ("pool_dropout", "hidden_dropout"):
        if not 0.0 <= m[key] < 1.0 or math.isnan(m[key]):
            _fail(f"model.{key}", m[key], "must be a fraction in [0, 1)")
    padding = m.padding
    if padding != "same":
        _per_axis(m, "padding", dims, 0, "or 'same'")
    strides = m.stride if isinstance(m.stride, ListConfig) else [m.stride]
    if padding == "same" and any(s != 1 for s in strides):
        _fail(
            "model.padding",
            padding,
            f"'same' needs model.stride=1 (got {_show(m.stride)}); give a number",
        )


def _per_axis(m: DictConfig, key: str, dims: int, low: int, also: str = "") -> None:
    """One whole number for every axis, or a list of one per axis of the input."""
    from cnnstudy.network.plan import AXES

    value = m[key]
    names = ", ".join(AXES[dims])
    per = f"or a list of {dims}, one per axis ({names})"
    if isinstance(value, ListConfig):
        items = list(value)
        if len(items) != dims:
            _fail(
                f"model.{key}",
                value,
                f"the input has {dims} ax{'is' if dims == 1 else 'es'} ({names}): give one "
                f"number for all, or {dims} in the list",
            )
        if any(isinstance(v, bool) or not isinstance(v, int) or v < low for v in items):
            _fail(f"model.{key}", value, f"every value must be a whole number >= {low}")
        return
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(f"model.{key}", value, f"must be a whole number >= {low} {also}{per}".strip())
    if value < low:
        word = f"must be at least {low}" if low else f"must be a whole number >= {low}"
        _fail(f"model.{key}", value, f"{word} {also}".strip())


def _check_data(cfg: DictConfig) -> None:
    d = cfg.data
    if d.name not in DATASETS:
        _fail("data.name", d.name, f"unknown dataset; valid: {', '.join(DATASETS)} (data=NAME)")
    if d.name == "folder" and not d.path:
        _fail("data.path", d.path, "data=folder needs the image folder: data.path=/some/images")
    if d.name == "csv":
        if not d.path:
            _fail("data.path", d.path, "data=csv needs the series' file: data.path=/x_TRAIN.tsv")
        if d.length is None or d.channels != 1:
            _fail(
                "data.channels",
                d.channels,
                "a CSV row is one series of one channel: data.channels=1 and data.length set "
                "(for several channels, use data=npz)",
            )
    if d.task not in TASKS:
        _fail("data.task", d.task, f"valid: {', '.join(TASKS)}")
    if d.task == "regression":
        if d.name not in ("ucr", "npz"):
            _fail(
                "data.task",
                d.task,
                f"data={d.name} holds classes; regression targets come from data=ucr (a "
                "regression set, e.g. data.problem=Covid3Month) or data=npz (float y_train)",
            )
        if d.classes:
            _fail("data.classes", list(d.classes), "a regression has no classes to keep")
        if cfg.trainer.precision in ("16-true", "bf16-true"):
            _fail(
                "trainer.precision",
                cfg.trainer.precision,
                "a regression's targets would be cast to half precision with the inputs; "
                "use 32-true or a mixed precision (bf16-mixed, 16-mixed)",
            )
    if d.name == "medmnist":
        from cnnstudy.data.files import MEDMNIST_3D

        if d.problem not in MEDMNIST_3D:
            _fail(
                "data.problem", d.problem, f"valid (MedMNIST's 3D sets): {', '.join(MEDMNIST_3D)}"
            )
        if not (d.depth == d.height == d.width and d.depth in (28, 64)) or d.channels != 1:
            _fail(
                "data.depth",
                d.depth,
                "MedMNIST's volumes are 28 or 64 a side, one channel: data.depth, data.height "
                "and data.width all 28 (or all 64), data.channels=1",
            )
    if d.name == "npz" and not d.path:
        _fail("data.path", d.path, "data=npz needs the arrays' file: data.path=/some/data.npz")
    if d.name == "moving_mnist":
        if d.depth is None or d.depth < 2 or d.channels != 1:
            _fail(
                "data.depth",
                d.depth,
                "moving MNIST clips have frames: data.depth=2 or more (the frames), "
                "data.channels=1",
            )
        for key in ("height", "width"):
            if d[key] is None or d[key] < 28:
                _fail(f"data.{key}", d[key], "a frame holds a 28x28 digit: at least 28")
        if d.clips < 10:
            _fail("data.clips", d.clips, "must be at least 10")
        if d.digits not in (1, 2):
            _fail(
                "data.digits", d.digits, "digits a clip: 1 (the class: the digit) or 2 (the pair)"
            )
        if d.num_classes not in (0, 10 if d.digits == 1 else 55):
            _fail(
                "data.num_classes",
                d.num_classes,
                f"moving MNIST with data.digits={d.digits} has "
                f"{10 if d.digits == 1 else 55} classes: set that, or 0",
            )
    if d.name == "sequential_mnist" and (
        d.length is None or (d.channels, d.length) not in ((1, 784), (28, 28))
    ):
        _fail(
            "data.length",
            d.length,
            f"sequential MNIST reads each 28x28 image as 784 steps of 1 pixel (data.length=784 "
            f"data.channels=1) or as 28 rows of 28 pixels (data.length=28 data.channels=28); "
            f"data.channels={d.channels}",
        )
    if d.fit not in FITS:
        _fail("data.fit", d.fit, f"valid: {', '.join(FITS)}")
    if d.bad_images not in ("error", "skip"):
        _fail("data.bad_images", d.bad_images, "valid: error, skip")
    _check_axes(d)
    for key in ("channels", "batch_size"):
        _at_least(cfg, "data", key, 1)
    _at_least(cfg, "data", "augment_shift", 0)
    if d.channels not in (1, 3) and d.name in IMAGE_SOURCES:
        _fail("data.channels", d.channels, "images are read as grayscale (1) or RGB (3)")
    if d.classes:
        if len(set(d.classes)) != len(d.classes) or min(d.classes) < 0:
            _fail("data.classes", list(d.classes), "class indices, each once, 0 or more")
        if len(d.classes) < 2:
            _fail("data.classes", list(d.classes), "a classifier needs at least 2 classes")
        if d.num_classes not in (0, len(d.classes)):
            _fail(
                "data.num_classes",
                d.num_classes,
                f"data.classes keeps {len(d.classes)} classes: set data.num_classes="
                f"{len(d.classes)} (or 0, counted from data.classes)",
            )
    elif d.task != "regression" and not (
        d.num_classes == 0 and d.name in ("folder", "npz", "csv", "medmnist", "ucr", "moving_mnist")
    ):
        _at_least(cfg, "data", "num_classes", 2)
    for key in ("val_fraction", "test_fraction"):
        _share(cfg, "data", key)
    if d.val_fraction + d.test_fraction >= 1.0:
        _fail(
            "data.val_fraction",
            d.val_fraction,
            f"with data.test_fraction={d.test_fraction} leaves no training data",
        )
    for key in ("mean", "std"):
        values = d[key]
        if values and len(values) != d.channels:
            _fail(f"data.{key}", values, f"needs one value per channel ({d.channels}) or []")
    if any(s <= 0 for s in d.std):
        _fail("data.std", d.std, "every standard deviation must be positive")


IMAGE_SOURCES = ("digits", "mnist", "fashion_mnist", "kmnist", "cifar10", "folder")


def _check_axes(d: DictConfig) -> None:
    """The input's axes: `length` for sequences, height x width for images, `depth` x
    height x width for volumes and clips; a key that cannot take effect is an error."""
    if d.length is not None:
        for key in ("height", "width", "depth"):
            if d[key] is not None:
                _fail(
                    f"data.{key}",
                    d[key],
                    f"cannot take effect: data.length={d.length} makes the input a sequence "
                    f"(1D); set data.{key}=null, or data.length=null for images",
                )
        wanted = ("length",)
    else:
        wanted = ("height", "width") if d.depth is None else ("depth", "height", "width")
    for key in wanted:
        if d[key] is None or d[key] < 1:
            _fail(f"data.{key}", d[key], "must be at least 1")
    if len(wanted) != 2:
        if d.name in IMAGE_SOURCES:
            _fail(
                f"data.{wanted[0]}",
                d[wanted[0]],
                f"data={d.name} holds 2D images: set data.length=null and data.depth=null",
            )
        for key, value in (("augment_shift", d.augment_shift), ("augment_flip", d.augment_flip)):
            if value:
                _fail(f"data.{key}", value, "shifts and flips apply to 2D images only")


def _check_trainer(cfg: DictConfig) -> None:
    t = cfg.trainer
    _at_least(cfg, "trainer", "max_epochs", 1)
    _at_least(cfg, "trainer", "num_threads", 0)
    for key in ("limit_train_batches", "limit_val_batches", "limit_test_batches"):
        _limit(cfg, key)
    if t.accelerator not in ("auto", "cpu", "gpu", "cuda", "mps"):
        _fail("trainer.accelerator", t.accelerator, "valid: auto, cpu, gpu, cuda, mps")
    if t.precision not in PRECISIONS:
        _fail("trainer.precision", t.precision, f"valid: {', '.join(PRECISIONS)}")
    if t.channels_last not in ("auto", True, False):
        _fail("trainer.channels_last", t.channels_last, "valid: auto, true, false")
    count = device_count(t.devices)
    if count is None:
        _fail(
            "trainer.devices",
            t.devices,
            "valid: 1, auto, N > 1 (one run on N devices: DDP), or device indices as a list "
            "([0] or [0, 1])",
        )
    if t.strategy not in STRATEGIES:
        _fail(
            "trainer.strategy",
            t.strategy,
            f"valid: {', '.join(STRATEGIES)}. ddp re-runs the command in every process (under "
            "-m, the whole study: Lightning #11300), and a fork after torch has started its "
            "threads hangs: cnnstudy starts DDP's processes with spawn",
        )
    _at_least(cfg, "trainer", "num_nodes", 1)
    if t.num_nodes > 1 and t.strategy != "auto":
        _fail(
            "trainer.strategy",
            t.strategy,
            "with trainer.num_nodes > 1 the processes are SLURM's tasks (srun): valid: auto",
        )
    if count > 1 and t.accelerator == "mps":
        _fail("trainer.devices", t.devices, "an Apple GPU is one device; valid with mps: 1")
    if t.matmul_precision not in ("highest", "high", "medium"):
        _fail("trainer.matmul_precision", t.matmul_precision, "valid: highest, high, medium")


STRATEGIES = ("auto", "ddp_spawn")


def srun_rank(cfg: DictConfig) -> int | None:
    """A run on several machines (`trainer.num_nodes` > 1): this process's global rank
    among the srun tasks that train it, one task per device; None for a run on one
    machine. What srun must have started is checked here, before anything is created."""
    t = cfg.trainer
    if t.num_nodes == 1:
        return None
    count = device_count(t.devices) or 1
    want = count * t.num_nodes
    tasks = os.environ.get("SLURM_NTASKS")
    per_node = os.environ.get("SLURM_NTASKS_PER_NODE", "").split("(")[0]
    if tasks is None or "SLURM_PROCID" not in os.environ:
        _fail(
            "trainer.num_nodes",
            t.num_nodes,
            f"a run on {t.num_nodes} machines starts as srun's tasks, one per device: srun "
            f"--nodes={t.num_nodes} --ntasks-per-node={count} cnnstudy-train "
            f"trainer.num_nodes={t.num_nodes} trainer.devices={count} ... (no srun task here: "
            "SLURM_NTASKS unset); valid outside srun: 1",
        )
    if int(tasks) != want or (per_node and int(per_node) != count):
        _fail(
            "trainer.num_nodes",
            t.num_nodes,
            f"{t.num_nodes} machines x trainer.devices={count} needs {want} srun tasks, "
            f"{count} per node; this job has SLURM_NTASKS={tasks}, SLURM_NTASKS_PER_NODE="
            f"{per_node or 'unset'}: valid: num_nodes x devices = the job's tasks",
        )
    return int(os.environ["SLURM_PROCID"])


def device_count(devices: Any) -> int | None:
    """How many processes train one run (`trainer.devices`), or None when not valid."""
    if isinstance(devices, ListConfig):
        devices = list(devices)
    if isinstance(devices, bool):
        return None
    if devices == "auto":
        return 1
    if isinstance(devices, str) and devices.strip().isdigit():
        devices = int(devices)
    if isinstance(devices, int):
        return devices if devices >= 1 else None
    if isinstance(devices, str) and devices.endswith(","):  # Lightning's "0," form
        parts = [p for p in devices.split(",") if p.strip()]
        ok = parts and all(p.strip().isdigit() for p in parts)
        return len(parts) if ok else None
    if isinstance(devices, list) and devices and all(isinstance(d, int) for d in devices):
        return len(devices) if len(set(devices)) == len(devices) else None
    return None


def _check_optimizer(cfg: DictConfig) -> None:
    optimizer = cfg.optimizer
    if not isinstance(optimizer, DictConfig) or not optimizer.get("_target_"):
        _fail("optimizer", optimizer, "must be a config with _target_ (optimizer=adam, adamw, sgd)")
    target = optimizer._target_
    if not isinstance(target, str) or not all(p.isidentifier() for p in target.split(".")):
        _fail("optimizer._target_", target, "must be a dotted class path, e.g. torch.optim.Adam")
    if "lr" in optimizer:
        lr = optimizer.lr
        if not _is_number(lr) or not lr > 0 or math.isinf(lr):
            _fail("optimizer.lr", lr, "the learning rate must be a positive number, e.g. 0.01")
    scheduler = cfg.scheduler
    if scheduler is not None and (
        not isinstance(scheduler, DictConfig) or "_target_" not in scheduler
    ):
        _fail(
            "scheduler",
            scheduler,
            "must be a config with _target_ (scheduler=onecycle, cosine, none)",
        )


def resolve(cfg: DictConfig) -> DictConfig:
    """The config a run trains from: a copy with a folder's class count filled in
    (data.num_classes=0) and data paths made absolute, so the stored config reproduces
    from any folder."""
    from cnnstudy.data.files import count_classes

    cfg = series_from_files(cfg) if cfg.data.name == "ucr" else cfg.copy()
    if cfg.data.classes and cfg.data.num_classes == 0:
        cfg.data.num_classes = len(cfg.data.classes)
    elif cfg.data.name == "folder" and cfg.data.num_classes == 0 and cfg.data.path:
        cfg.data.num_classes = count_classes(Path(cfg.data.path))
    elif cfg.data.name == "csv" and cfg.data.num_classes == 0 and cfg.data.path:
        from cnnstudy.data.files import csv_labels

        found = csv_labels(cfg.data.path)
        if cfg.data.test_path:
            found |= csv_labels(cfg.data.test_path)
        cfg.data.num_classes = len(found)
    elif (
        cfg.data.name == "npz"
        and cfg.data.num_classes == 0
        and cfg.data.path
        and cfg.data.task != "regression"
    ):
        from cnnstudy.data.files import count_npz_classes

        cfg.data.num_classes = count_npz_classes(cfg.data)
    elif cfg.data.name == "moving_mnist" and cfg.data.num_classes == 0:
        cfg.data.num_classes = 10 if cfg.data.digits == 1 else 55
    elif cfg.data.name == "medmnist" and cfg.data.num_classes == 0:
        from cnnstudy.data.files import MEDMNIST_3D, medmnist_info

        if cfg.data.problem in MEDMNIST_3D:
            cfg.data.num_classes = len(medmnist_info(cfg.data.problem)["label"])
    for key in ("root", "path", "test_path", "cache_dir"):
        if cfg.data[key]:
            cfg.data[key] = str(Path(cfg.data[key]).expanduser().resolve())
    return cfg


def series_from_files(cfg: DictConfig) -> DictConfig:
    """data=ucr: a copy of cfg whose data.length, channels, num_classes and task, where
    unset (null, 0, 0, null), are read from the .ts files, and where set, checked
    against them; series of unequal lengths refused (data.unequal=error) or padded to
    data.length, the longest by default (data.unequal=pad)."""
    from cnnstudy.data.files import ts_files, ts_summary

    d = cfg.data
    if d.unequal not in ("error", "pad"):
        _fail("data.unequal", d.unequal, "valid: error (refuse unequal lengths), pad (zero-pad)")
    if not d.path and not d.problem:
        _fail("data.problem", d.problem, "data=ucr needs a set (data.problem=GunPoint) or files")
    found = [ts_summary(path) for _, path in ts_files(d)]
    key, value = ("data.path", d.path) if d.path else ("data.problem", d.problem)
    if len({s["channels"] for s in found}) > 1:
        _fail(key, value, "its train and test series differ in channels")
    if any(s["missing"] for s in found):
        _fail(
            key,
            value,
            "its series hold missing values ('?' or NaN); cnnstudy does not fill them: fill "
            "or drop them first",
        )
    regression = found[0]["regression"]
    if any(s["regression"] != regression for s in found):
        _fail(key, value, "one file has regression targets (@targetLabel), the other classes")
    cfg = cfg.copy()
    d = cfg.data
    task = "regression" if regression else "classification"
    if d.task is None:
        d.task = task
    elif d.task != task:
        _fail("data.task", d.task, f"{value} is a {task} set: data.task={task} or null")
    channels = found[0]["channels"]
    if d.channels == 0:
        d.channels = channels
    elif d.channels != channels:
        _fail("data.channels", d.channels, f"{value} has {channels}: set it, or 0 (from the files)")
    if not regression:
        classes = list(found[0]["classes"])
        for s in found[1:]:  # aeon reads labels in lower case: one class whatever the case
            seen = {c.lower() for c in classes}
            classes += [c for c in s["classes"] if c.lower() not in seen]
        if d.num_classes == 0:
            d.num_classes = len(classes)
        elif d.num_classes != len(classes):
            _fail(
                "data.num_classes",
                d.num_classes,
                f"{value} has {len(classes)} classes: set it, or 0 (from the files)",
            )
    shortest = min(s["shortest"] for s in found)
    longest = max(s["longest"] for s in found)
    if shortest != longest:
        if d.unequal == "error":
            _fail(
                "data.unequal",
                d.unequal,
                f"{value}'s series run from {shortest} to {longest} steps: set "
                f"data.unequal=pad to zero-pad each at its end to data.length (default the "
                f"longest, {longest}), or choose a set of equal lengths",
            )
        if d.length is not None and d.length < longest:
            _fail(
                "data.length",
                d.length,
                f"{value}'s longest series has {longest} steps; padding never cuts: set "
                f"data.length={longest} or more, or null",
            )
    elif d.length is not None and d.length != longest:
        _fail(
            "data.length",
            d.length,
            f"{value}'s series have {longest} steps: set data.length={longest}, or null",
        )
    if d.length is None:
        d.length = longest
    return cfg


def check(cfg: DictConfig) -> list:
    """Check everything the types do not, then the architecture's arithmetic; raise
    ConfigError, or return the shape plan (network.plan.Layer rows). `cfg` is unchanged."""
    from cnnstudy.network.plan import dims_of, plan

    _unknown_keys(cfg)
    if cfg.data.name == "ucr":
        cfg = series_from_files(cfg)
    _check_data(cfg)
    _check_model(cfg.model, dims_of(cfg.data))
    _check_trainer(cfg)
    _check_optimizer(cfg)
    data = cfg.data
    if data.num_classes == 0:
        data = resolve(cfg).data
    return plan(cfg.model, data)
