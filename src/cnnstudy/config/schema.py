"""The config schema: every design choice of a run, typed, with its default.

Hydra composes `conf/train.yaml` on top of `TrainConfig`, so a key that is not
declared here is an error, and a value of the wrong type is an error, before
anything else runs. Range checks that types cannot express live in `check`.
Defaults are stated here once; the files in conf/ hold what differs from them.
This module imports only Hydra: describe and error paths stay fast.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore

ACTIVATIONS = ("relu", "tanh", "sigmoid", "none")
POOLS = ("max", "avg", "none")
DATASETS = (
    "digits",
    "mnist",
    "fashion_mnist",
    "kmnist",
    "cifar10",
    "folder",
    "sequential_mnist",
    "moving_mnist",
    "npz",
    "csv",
    "ucr",
    "medmnist",
)
TASKS = ("classification", "regression")
FITS = ("resize", "pad", "resize_pad")
PRECISIONS = ("auto", "32-true", "32", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true")


@dataclass
class ModelConfig:
    """The network. Conv stages are sized by `filters` and `filter_growth`, or by an explicit
    `filters_per_stage` list with those two set to null; hidden layers likewise by
    `hidden_units` and `hidden_growth`, or `hidden_units_per_layer`. One form at a time: a
    key that could not take effect is an error, so a sweep over it always changes the
    network. Grown counts round to the nearest whole number, halves up, at least 1."""

    name: str = "seed_example"  # shown in run names and reports
    stages: int = 1  # conv/pool stages; 0 makes a plain multilayer perceptron
    convs_per_stage: int = 1  # conv layers before each pool
    filters: int | None = 10  # filters in the first stage
    filter_growth: float | None = 1.0  # x per stage: 2 ascending, 1 constant, 0.5 descending
    filters_per_stage: list[int] | None = None  # explicit counts, with filters/growth null
    # F, S, P and the pool's window and stride: one number for every axis of the input, or
    # a list of one per axis ([3, 5, 5] for a 3D clip: 3 frames by 5x5 pixels)
    receptive_field: Any = 5  # F: side of each conv filter
    stride: Any = 1  # S: conv stride
    padding: Any = 0  # P: zero padding on each side, or "same" (output size = input size)
    activation: str = "relu"  # after each conv and hidden layer: relu, tanh, sigmoid, none
    pool: str = "max"  # after each stage: max, avg, none
    pool_size: Any = 2
    pool_stride: Any = 2
    pool_dropout: float = 0.0  # dropout after each pool
    hidden_layers: int = 1  # fully connected layers before the output layer
    hidden_units: int | None = 200  # units in the first hidden layer
    hidden_growth: float | None = 1.0  # x per hidden layer (0.7: 120 -> 84)
    hidden_units_per_layer: list[int] | None = None  # explicit, with units/growth null
    hidden_dropout: float = 0.0  # dropout after each hidden layer


@dataclass
class DataConfig:
    name: str = "digits"  # digits, mnist, fashion_mnist, kmnist, cifar10, folder
    root: str = "data"  # torchvision datasets: the folder holding MNIST/raw, cifar-10-batches-py...
    download: bool = False  # torchvision datasets: fetch missing files (needs the internet)
    path: str = ""  # folder: one subfolder of images per class (torchvision's ImageFolder layout)
    test_path: str = ""  # csv, ucr: the test series' file (empty: data.test_fraction held out)
    # ucr: a UCR/UEA set aeon ships (GunPoint, BasicMotions, ...); medmnist: a 3D set
    problem: str | None = None
    # classification (cross-entropy, accuracy) or regression (one number a sample: MSE,
    # RMSE, MAE, R2); null: from the data (ucr: its file's @targetLabel)
    task: str | None = "classification"
    unequal: str = "error"  # ucr: series of unequal lengths refused (error) or zero-padded (pad)
    channels: int = 1  # input channels the network sees (images are converted: L or RGB)
    # the input's axes: height x width for images; `length` alone for sequences (1D, with
    # height and width null); `depth` x height x width for volumes and clips (3D)
    height: int | None = 32
    width: int | None = 32
    length: int | None = None
    depth: int | None = None
    # moving_mnist: training clips made (a sixth as many test clips), and their seed
    clips: int = 6000
    clip_seed: int = 0
    digits: int = 1  # moving_mnist: digits a clip, 1 (the class: the digit) or 2 (the pair)
    fit: str = "resize"  # how images reach height x width: resize, pad (centre/crop), resize_pad
    bad_images: str = (
        "error"  # folder: unreadable files stop the run (error) or are left out (skip)
    )
    num_classes: int = 10  # 0: count the class folders (data=folder), or len(data.classes)
    # a subset of the classes, by index (e.g. [0, 1] for the digits 0 and 1), relabelled
    # 0..k-1 in every split; empty: all of them
    classes: list[int] = field(default_factory=list)
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
    # devices: 1, or N > 1 for one run trained by N processes (DDP: gloo on CPUs, NCCL on
    # GPUs), started by `strategy`; [i] picks one device
    devices: Any = 1
    strategy: str = "auto"  # auto: ddp_spawn with several devices; never a re-run of sys.argv
    # num_nodes: machines for one run; N > 1 runs under srun, one task per device (ddp)
    num_nodes: int = 1
    matmul_precision: str = "highest"  # float32 matmuls on GPUs: high allows TF32 (trainer=gpu)
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
    # pictures: first-layer filters, feature maps, confusion matrix, misclassified images
    log_images: bool = True
    run_name: str = ""  # empty: named after the overrides, i.e. what was varied
    tags: dict[str, str] = field(default_factory=dict)  # extra tags for the run
    parent_run_id: str = ""  # nest the run under this one (a study's trial: set by the sweeper)


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
