"""The config schema: every design choice of a run, typed, with its default.

Hydra composes `conf/train.yaml` on top of `TrainConfig`, so a key that is not
declared here is an error, and a value of the wrong type is an error, before
anything else runs. Range checks that types cannot express live in `check`.
This module imports only Hydra and OmegaConf: describe and error paths stay fast.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, ListConfig, OmegaConf

CONFIG_DIR = Path(__file__).resolve().parents[2] / "conf"

ACTIVATIONS = ("relu", "tanh", "sigmoid", "none")
POOLS = ("max", "avg", "none")
DATASETS = ("digits", "mnist", "fashion_mnist", "kmnist", "cifar10", "folder")
FITS = ("resize", "pad", "resize_pad")
PRECISIONS = ("auto", "32-true", "32", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true")


class ConfigError(ValueError):
    """A user error in the composed config: the message names key, value and what is valid."""


@dataclass
class ModelConfig:
    name: str = "seed_example"  # shown in run names and reports
    stages: int = 1  # conv/pool stages; 0 makes a plain multilayer perceptron
    convs_per_stage: int = 1  # conv layers before each pool
    filters: int = 10  # filters in the first stage
    filter_growth: float = (
        1.0  # filters multiply by this per stage: 2 ascending, 1 constant, 0.5 descending
    )
    filters_per_stage: list[int] = field(
        default_factory=list
    )  # explicit counts; overrides the two above
    receptive_field: int = 5  # F: side of each conv filter
    stride: int = 1  # S: conv stride
    padding: Any = 0  # P: zero padding on each side, or "same" (output size = input size, stride 1)
    activation: str = "relu"  # after each conv and hidden layer: relu, tanh, sigmoid, none
    pool: str = "max"  # after each stage: max, avg, none
    pool_size: int = 2
    pool_stride: int = 2
    pool_dropout: float = 0.0  # dropout after each pool
    hidden_layers: int = 1  # fully connected layers before the output layer
    hidden_units: int = 200  # units in each hidden layer
    hidden_units_per_layer: list[int] = field(
        default_factory=list
    )  # explicit; overrides hidden_units
    hidden_dropout: float = 0.0  # dropout after each hidden layer


@dataclass
class DataConfig:
    name: str = "digits"  # digits, mnist, fashion_mnist, kmnist, cifar10, folder
    root: str = "data"  # torchvision datasets: the folder holding MNIST/raw, cifar-10-batches-py...
    download: bool = False  # torchvision datasets: fetch missing files (needs the internet)
    path: str = ""  # folder: one subfolder of images per class (torchvision's ImageFolder layout)
    channels: int = 1  # input channels the network sees (images are converted: L or RGB)
    height: int = 32
    width: int = 32
    fit: str = "resize"  # how images reach height x width: resize, pad (centre/crop), resize_pad
    bad_images: str = (
        "error"  # folder: unreadable files stop the run (error) or are left out (skip)
    )
    num_classes: int = 10  # 0: count the class folders (data=folder)
    batch_size: int = 128
    val_fraction: float = 0.1  # of the training pool, held out for validation
    test_fraction: float = 0.2  # for datasets without a test split of their own
    split_seed: int = 0  # the split depends on this seed only, not on the run's seed
    # per-channel pixel mean and std (0-255); empty: computed on the training split
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)
    augment_shift: int = 0  # training batches: random translations of up to this many pixels
    augment_flip: bool = False  # training batches: random horizontal flips (not for digits!)
    cache_dir: str = ""  # decoded-data cache; empty: $CNNSTUDY_CACHE or ~/.cache/cnnstudy


@dataclass
class TrainerConfig:
    max_epochs: int = 3
    accelerator: str = "auto"  # cpu, gpu, auto: as Lightning's Trainer
    devices: Any = 1
    precision: str = (
        "auto"  # auto: bf16-mixed on GPUs with bf16, else 32-true; or Lightning's names
    )
    deterministic: bool = True  # bitwise reproducible on CPU; cnnstudy-reproduce relies on it
    channels_last: Any = "auto"  # NHWC memory format; auto: on wherever the network has conv layers
    limit_train_batches: Any = None  # int (batches) or float (share); None: all
    limit_val_batches: Any = None
    limit_test_batches: Any = None
    progress_bar: bool = True
    num_threads: int = 0  # torch CPU threads; 0 leaves torch's default
    cpu_kernels: bool = True  # cnnstudy's vectorized CPU max pool where it builds; same results


@dataclass
class LoggerConfig:
    tracking_uri: str = "sqlite:///mlflow.db"  # MLFLOW_TRACKING_URI, when set, wins over this
    experiment_name: str = "cnnstudy"
    artifact_location: str = "mlartifacts"  # for new experiments; relative paths start at the cwd
    log_model: bool = True  # log the trained network (torch.export archive) to the run
    run_name: str = ""  # empty: named after the overrides, i.e. what was varied
    tags: dict[str, str] = field(default_factory=dict)  # extra tags for the run


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    optimizer: Any = None  # a _target_ config for torch.optim, instantiated with _partial_
    scheduler: Any = None  # a _target_ config for torch.optim.lr_scheduler, or _target_: null
    seed: int = 0


def register() -> None:
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)


register()


# ---------------------------------------------------------------------------- checks


def _fail(key: str, value: Any, why: str) -> None:
    raise ConfigError(f"{key}={_show(value)}: {why}")


def _show(value: Any) -> str:
    if isinstance(value, (ListConfig, DictConfig)):
        value = OmegaConf.to_container(value)
    return str(value)


def _at_least(cfg: DictConfig, section: str, key: str, low: float) -> None:
    value = cfg[section][key]
    if value < low:
        _fail(f"{section}.{key}", value, f"must be at least {low}")


def _share(cfg: DictConfig, section: str, key: str, top_open: bool = True) -> None:
    value = cfg[section][key]
    if not (0.0 <= value < 1.0 if top_open else 0.0 <= value <= 1.0) or math.isnan(value):
        _fail(f"{section}.{key}", value, "must be a fraction in [0, 1)")


def _limit(cfg: DictConfig, key: str) -> None:
    value = cfg.trainer[key]
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _fail(f"trainer.{key}", value, "must be a number of batches (int), a share (float) or null")
    if isinstance(value, float) and not 0.0 <= value <= 1.0:
        _fail(f"trainer.{key}", value, "a share of batches must be in [0, 1] (0 skips the stage)")
    if isinstance(value, int) and value < 0:
        _fail(f"trainer.{key}", value, "a number of batches must be at least 0 (0 skips the stage)")


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


def check(cfg: DictConfig) -> None:
    """Check everything the types do not, then the architecture's arithmetic; raise ConfigError."""
    from cnnstudy.architecture import plan

    _unknown_keys(cfg)
    m = cfg.model
    if m.activation not in ACTIVATIONS:
        _fail(
            "model.activation", m.activation, f"unknown activation; valid: {', '.join(ACTIVATIONS)}"
        )
    if m.pool not in POOLS:
        _fail("model.pool", m.pool, f"unknown pooling kind; valid: {', '.join(POOLS)}")
    for key in ("stages", "hidden_layers"):
        _at_least(cfg, "model", key, 0)
    for key in ("convs_per_stage", "filters", "receptive_field", "stride", "hidden_units"):
        _at_least(cfg, "model", key, 1)
    for key in ("pool_size", "pool_stride"):
        _at_least(cfg, "model", key, 1)
    if not m.filter_growth > 0:
        _fail(
            "model.filter_growth",
            m.filter_growth,
            "must be positive (2 doubles per stage, 1 keeps)",
        )
    for key in ("pool_dropout", "hidden_dropout"):
        _share(cfg, "model", key)
    padding = m.padding
    if isinstance(padding, bool) or not (
        padding == "same" or (isinstance(padding, int) and padding >= 0)
    ):
        _fail("model.padding", padding, "must be a whole number >= 0 or 'same'")
    if padding == "same" and m.stride != 1:
        _fail(
            "model.padding", padding, f"'same' needs model.stride=1 (got {m.stride}); give a number"
        )
    if m.filters_per_stage and len(m.filters_per_stage) != m.stages:
        _fail(
            "model.filters_per_stage",
            m.filters_per_stage,
            f"needs one count per stage ({m.stages})",
        )
    if any(n < 1 for n in m.filters_per_stage):
        _fail("model.filters_per_stage", m.filters_per_stage, "every count must be at least 1")
    if m.hidden_units_per_layer and len(m.hidden_units_per_layer) != m.hidden_layers:
        _fail(
            "model.hidden_units_per_layer",
            m.hidden_units_per_layer,
            f"needs one count per hidden layer ({m.hidden_layers})",
        )
    if any(n < 1 for n in m.hidden_units_per_layer):
        _fail("model.hidden_units_per_layer", m.hidden_units_per_layer, "every count must be >= 1")

    d = cfg.data
    if d.name not in DATASETS:
        _fail("data.name", d.name, f"unknown dataset; valid: {', '.join(DATASETS)} (data=NAME)")
    if d.name == "folder" and not d.path:
        _fail("data.path", d.path, "data=folder needs the image folder: data.path=/some/images")
    if d.fit not in FITS:
        _fail("data.fit", d.fit, f"valid: {', '.join(FITS)}")
    if d.bad_images not in ("error", "skip"):
        _fail("data.bad_images", d.bad_images, "valid: error, skip")
    for key in ("channels", "height", "width", "batch_size"):
        _at_least(cfg, "data", key, 1)
    _at_least(cfg, "data", "augment_shift", 0)
    if d.channels not in (1, 3):
        _fail("data.channels", d.channels, "images are read as grayscale (1) or RGB (3)")
    if d.num_classes == 0 and d.name == "folder":
        from cnnstudy.datafiles import count_classes

        d.num_classes = count_classes(Path(d.path))
    _at_least(cfg, "data", "num_classes", 2)
    for key in ("val_fraction", "test_fraction"):
        _share(cfg, "data", key)
    if cfg.data.val_fraction + cfg.data.test_fraction >= 1.0:
        _fail(
            "data.val_fraction",
            cfg.data.val_fraction,
            f"with data.test_fraction={cfg.data.test_fraction} leaves no training data",
        )
    for key in ("mean", "std"):
        values = cfg.data[key]
        if values and len(values) != cfg.data.channels:
            _fail(f"data.{key}", values, f"needs one value per channel ({cfg.data.channels}) or []")
    if any(s <= 0 for s in cfg.data.std):
        _fail("data.std", cfg.data.std, "every standard deviation must be positive")

    _at_least(cfg, "trainer", "max_epochs", 1)
    _at_least(cfg, "trainer", "num_threads", 0)
    for key in ("limit_train_batches", "limit_val_batches", "limit_test_batches"):
        _limit(cfg, key)
    if cfg.trainer.accelerator not in ("auto", "cpu", "gpu", "cuda", "mps"):
        _fail("trainer.accelerator", cfg.trainer.accelerator, "valid: auto, cpu, gpu, cuda, mps")
    if cfg.trainer.precision not in PRECISIONS:
        _fail("trainer.precision", cfg.trainer.precision, f"valid: {', '.join(PRECISIONS)}")
    if cfg.trainer.channels_last not in ("auto", True, False):
        _fail("trainer.channels_last", cfg.trainer.channels_last, "valid: auto, true, false")

    optimizer = cfg.optimizer
    if not isinstance(optimizer, DictConfig) or "_target_" not in optimizer:
        _fail("optimizer", optimizer, "must be a config with _target_ (e.g. optimizer=adam)")
    if "lr" in optimizer and not optimizer.lr > 0:
        _fail("optimizer.lr", optimizer.lr, "the learning rate must be positive")
    scheduler = cfg.scheduler
    if scheduler is not None and (
        not isinstance(scheduler, DictConfig) or "_target_" not in scheduler
    ):
        _fail(
            "scheduler",
            scheduler,
            "must be a config with _target_ (scheduler=onecycle, cosine, none)",
        )

    plan(cfg.model, cfg.data)


# ---------------------------------------------------------------------------- composing


def compose(overrides: list[str], config_dir: Path | None = None) -> DictConfig:
    """Compose conf/train.yaml with command-line style overrides, as the Hydra app does."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(str(config_dir or CONFIG_DIR), version_base="1.3"):
            return hydra_compose("train", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(str(err).strip()) from None
