"""cnnstudy-train: one training run, from a composed config to metrics in MLflow.

    cnnstudy-train                                   # seed_example on the bundled digits
    cnnstudy-train model=lenet5 trainer.max_epochs=5
    cnnstudy-train -m model.receptive_field=3,5,7    # Hydra multirun: one MLflow run each

`train(cfg)` is the whole run as one function call: check the config, load the
data (once per process), build the network from the shape plan, fit and test
with Lightning, record everything in one MLflow run, and return the metrics.
It leaves no global state behind (seeds, RNG state, thread count, determinism
flags are restored), so a sweep can call it hundreds of times in one process;
the one setting it leaves on, on purpose, is flush-to-zero of denormal floats.
Heavy imports (torch, Lightning, MLflow) happen only after the config is checked.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from signal import SIGTERM
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from cnnstudy.config.check import check, device_count, resolve, srun_rank
from cnnstudy.config.compose import CONFIG_DIR
from cnnstudy.data.files import check_files
from cnnstudy.errors import (
    EXIT_USER_ERROR,
    ConfigError,
    Diverged,
    Interrupted,
    Stopped,
    console_script,
    report,
)
from cnnstudy.log import get as get_log
from cnnstudy.network.memory import fits_message, host_available
from cnnstudy.network.plan import dims_of, input_size, totals
from cnnstudy.redact import RedactingFilter, override_secret
from cnnstudy.run import context, store
from cnnstudy.run.lifecycle import (
    interrupted_by,
    mark_orphans,
    process_tags,
    raise_if_signalled,
    signals_interrupt,
    stop_ranks_on_signal,
)
from cnnstudy.run.tracking import record_setup, run_name, run_tags

_EXPECTED_WARNINGS = (
    r".*is smaller than the logging interval",  # metrics are logged per epoch, not per step
    r".*isinstance\(treespec, LeafSpec\)",  # Lightning 2.6 on torch 2.14, harmless
    r"It is recommended to use `self.log\(",  # DDP: the classifier sums across processes
    # numpy's, when a data package (aeon, medmnist) imports it under torch's flush-to-zero
    r"The value of the smallest subnormal",
)


def is_timing(metric: str) -> bool:
    """Metrics that measure the machine's speed, not the computation: never compared."""
    return metric.startswith("time/") or metric.endswith("images_per_s")


@dataclass
class RunResult:
    run_id: str
    experiment_id: str
    tracking_uri: str
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    samples: str = "images"  # what train/images_per_s counts: images, series or volumes


@contextlib.contextmanager
def _isolated_globals(num_threads: int) -> Iterator[None]:
    """Restore what seeding and deterministic training change process-wide.

    Python's RNG state is saved before torch and numpy are imported: a first import
    may draw from it.
    """
    saved_py = random.getstate()
    saved_env = {
        k: os.environ.get(k)
        for k in (
            "PL_GLOBAL_SEED",
            "PL_SEED_WORKERS",
            "CUBLAS_WORKSPACE_CONFIG",
            "CUDA_VISIBLE_DEVICES",
        )
    }
    import numpy as np
    import torch

    saved_np = np.random.get_state()
    saved_threads = torch.get_num_threads()
    saved_deterministic = torch.are_deterministic_algorithms_enabled()
    saved_fill = torch.utils.deterministic.fill_uninitialized_memory
    try:
        with torch.random.fork_rng(devices=[]):
            if num_threads:
                torch.set_num_threads(num_threads)
            # Deterministic mode would also fill every new tensor's memory before the kernel
            # that writes it overwrites it: 21 fills a step instead of 5 (the seed network's
            # profiled CPU step went from 6.25 to 5.78 ms without them). Kernels here write
            # whole outputs, so the fill changes nothing computed.
            torch.utils.deterministic.fill_uninitialized_memory = False
            yield
    finally:
        torch.set_num_threads(saved_threads)
        torch.use_deterministic_algorithms(saved_deterministic)
        torch.utils.deterministic.fill_uninitialized_memory = saved_fill
        random.setstate(saved_py)
        np.random.set_state(saved_np)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _quiet_lightning(gpu: bool) -> None:
    """One console line per Lightning message, none advertising its cloud logger, and on a
    CPU run none about accelerators that are not there.

    Lightning's rank-zero messages go through `lightning_utilities.core.rank_zero.log`,
    which the last of `lightning.pytorch` and `pytorch_lightning` to be imported points at
    its own logger (MLflow's model logging imports pytorch_lightning): pointed back, every
    run, so the filter applies to every run in a process.
    """
    import logging

    from lightning_utilities.core import rank_zero as shared_rank_zero

    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    shared_rank_zero.log = rank_zero
    root_handled = logging.getLogger().hasHandlers()
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        package_logger = logging.getLogger(name)
        if root_handled:  # Hydra configured logging: let the root print it, once
            for handler in list(package_logger.handlers):
                if type(handler) is logging.StreamHandler:
                    package_logger.removeHandler(handler)
            package_logger.propagate = True
    for f in [f for f in rank_zero.filters if isinstance(f, _Quiet)]:
        rank_zero.removeFilter(f)
    rank_zero.addFilter(_Quiet(gpu))


class _Quiet:
    """Drops Lightning's advert for its cloud logger, a notice about its own internals, and
    on CPU runs the accelerator inventory (GPU available: False, TPU available...)."""

    def __init__(self, gpu: bool) -> None:
        self.gpu = gpu

    def filter(self, record: Any) -> bool:
        text = str(record.msg)
        if "litlogger" in text or "to estimate number of stepping batches" in text:
            return False
        return self.gpu or not text.startswith(("GPU available", "TPU available", "HPU available"))


def optimizer_factories(cfg: DictConfig):
    """(optimizer factory, scheduler factory or None), each tried once on a dummy parameter
    so that a bad class, key or value is a config error now, not a crash mid-fit.

    The scheduler runs per batch over the whole run: its total_steps (OneCycleLR) or T_max
    (CosineAnnealingLR) is filled in from the trainer's estimated number of steps.
    """
    import inspect

    import torch
    from hydra.utils import instantiate

    def attempt(group: str, build):
        try:
            return build()
        except Exception as err:  # noqa: BLE001 -- any failure of a user's class is theirs
            while err.__cause__ is not None:  # Hydra wraps the class's own error
                err = err.__cause__
            message = str(err).strip().splitlines()[-1] if str(err).strip() else ""
            message = f"{type(err).__name__}: {message}" if message else type(err).__name__
            keys = ", ".join(k for k in cfg[group] if k not in ("_target_", "_partial_"))
            raise ConfigError(
                f"{group}._target_={cfg[group]._target_} with {group} keys ({keys}) cannot be "
                f"built: {message}. Valid: a class of torch.optim"
                f"{'.lr_scheduler' if group == 'scheduler' else ''} and the arguments its "
                "constructor takes"
            ) from None

    optimizer = attempt(
        "optimizer", lambda: instantiate(cfg.optimizer, _partial_=True, _convert_="all")
    )
    dummy = attempt("optimizer", lambda: optimizer([torch.nn.Parameter(torch.zeros(1))]))
    if cfg.scheduler is None or cfg.scheduler.get("_target_") is None:
        return optimizer, None
    partial = attempt(
        "scheduler", lambda: instantiate(cfg.scheduler, _partial_=True, _convert_="all")
    )
    accepts = [
        k for k in ("total_steps", "T_max") if k in inspect.signature(partial.func).parameters
    ]
    scheduler = SchedulerFactory(partial, accepts)
    attempt("scheduler", lambda: scheduler(dummy, 10))
    return optimizer, scheduler


class SchedulerFactory:
    """The scheduler of an optimizer, its length (total_steps, T_max) filled in from the
    run's number of steps. A class, not a closure: DDP's processes receive it pickled."""

    def __init__(self, partial: Any, lengths: list[str]) -> None:
        self.partial, self.lengths = partial, lengths

    def __call__(self, opt: Any, total_steps: int) -> Any:
        given = {k: total_steps for k in self.lengths}
        pct = self.partial.keywords.get("pct_start")
        if "total_steps" in given and pct is not None and float(pct) * total_steps == 1:
            # OneCycleLR divides by its warm-up's length, pct_start x total_steps - 1 steps:
            # 0 here (5 steps at 0.2). The next float up: the same schedule, one that runs
            given["pct_start"] = math.nextafter(float(pct), 1.0)
        return self.partial(opt, **given)


@dataclass
class Hardware:
    gpu: bool
    precision: str
    channels_last: bool


def resolve_hardware(cfg: DictConfig) -> Hardware:
    """Precision and memory format that follow the device unless the config fixes them:
    bf16 mixed precision on GPUs that support it, float32 elsewhere; channels_last
    wherever the network has conv layers (oneDNN and cuDNN both run NHWC faster).
    An accelerator asked for and not there is a config error."""
    import torch

    t = cfg.trainer
    cuda = torch.cuda.is_available()
    if t.accelerator in ("gpu", "cuda") and not cuda:
        raise ConfigError(
            f"trainer.accelerator={t.accelerator}: torch sees no CUDA GPU on this machine "
            f"(torch {torch.__version__}, CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); valid here: cpu, auto"
        )
    if t.accelerator == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("trainer.accelerator=mps: no Apple GPU here; valid here: cpu, auto")
    gpu = t.accelerator in ("auto", "gpu", "cuda") and cuda
    count = device_count(t.devices) or 1
    if gpu and count > torch.cuda.device_count():
        raise ConfigError(
            f"trainer.devices={t.devices}: torch sees {torch.cuda.device_count()} GPU(s) here "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); valid: "
            f"at most {torch.cuda.device_count()}, or trainer.accelerator=cpu"
        )
    if gpu:  # TF32 where the config allows it (trainer=gpu: high)
        torch.set_float32_matmul_precision(t.matmul_precision)
    precision = t.precision
    if precision == "auto":
        precision = "bf16-mixed" if gpu and torch.cuda.is_bf16_supported() else "32-true"
    channels_last = t.channels_last
    two_d = dims_of(cfg.data) == 2  # torch's channels_last is a layout of 2D maps
    if channels_last == "auto":
        channels_last = cfg.model.stages > 0 and two_d
    elif channels_last and not two_d:
        raise ConfigError(
            f"trainer.channels_last=true: a memory format of 2D images; this input has "
            f"{dims_of(cfg.data)}D maps. Valid here: auto, false"
        )
    return Hardware(gpu, precision, bool(channels_last))


def _check_memory(layers: list, cfg: DictConfig, gpu: bool = False) -> None:
    """Refuse a network that cannot fit, naming its largest layer, before it is built: in
    host memory (where it is built, no torch needed), and with `gpu` in the GPU's."""
    if gpu:
        import torch

        free, _ = torch.cuda.mem_get_info()
        problem = fits_message(layers, cfg.data.batch_size, free, "free on the GPU")
    else:
        available = host_available()
        problem = available and fits_message(layers, cfg.data.batch_size, available, "available")
    if problem:
        raise ConfigError(problem)


def _cpu_kernels(cfg: DictConfig, hardware: Hardware) -> str:
    """Which max pool a run uses, for its tags; builds cnnstudy's kernel (once per machine)
    before the fit, not inside its timing."""
    if not cfg.trainer.cpu_kernels:
        return "off"
    if hardware.gpu:
        return "unused on GPU"
    if dims_of(cfg.data) != 2:
        return f"unused: {dims_of(cfg.data)}D maps (the kernels are for 2D maps)"
    from cnnstudy.network.cpu_kernels import build

    done = build()
    return "maxpool" if done.library is not None else f"torch's max pool: {done.status}"


def _trainer(cfg: DictConfig, hardware: Hardware, logger: Any, callbacks: list[Any], root_dir: str):
    import lightning as L

    t = cfg.trainer
    # CUDA has no deterministic max-pool backward: on a GPU, warn about such ops instead of
    # stopping (runs there are close, not bitwise equal; see cnnstudy-reproduce --tolerance).
    deterministic = "warn" if hardware.gpu and t.deterministic else t.deterministic
    if t.progress_bar:
        from cnnstudy.run.classifier import RunProgressBar

        callbacks = [*callbacks, RunProgressBar(leave=True)]
    devices = 1 if t.devices == "auto" else t.devices
    strategy = "auto"
    from lightning.pytorch.plugins.environments import LightningEnvironment, SLURMEnvironment

    # cnnstudy starts the processes of a run on one machine itself (ddp_spawn): inside a
    # SLURM job, Lightning would otherwise take the job's one task for the world
    # (SLURMEnvironment: every spawned process rank 0 of 1) and requeue the job on SIGUSR1
    environment: Any = LightningEnvironment()
    if t.num_nodes > 1:  # srun started every process (srun_rank): ddp runs no launcher
        strategy, environment = "ddp", SLURMEnvironment(auto_requeue=False)
    elif (device_count(t.devices) or 1) > 1:  # DDP: processes spawned, never sys.argv re-run
        from cnnstudy.run.classifier import RankGuard

        strategy = "ddp_spawn" if t.strategy == "auto" else t.strategy
        callbacks = [*callbacks, RankGuard(t.num_threads, _EXPECTED_WARNINGS)]

    return L.Trainer(
        max_epochs=t.max_epochs,
        accelerator=t.accelerator,
        devices=devices,
        num_nodes=t.num_nodes,
        strategy=strategy,
        plugins=[environment],
        precision=hardware.precision,
        deterministic=deterministic,
        limit_train_batches=t.limit_train_batches,
        limit_val_batches=t.limit_val_batches,
        limit_test_batches=t.limit_test_batches,
        enable_progress_bar=t.progress_bar,
        enable_model_summary=False,  # cnnstudy's describe table is logged instead
        enable_checkpointing=False,  # the trained network is logged to MLflow
        num_sanity_val_steps=0,
        # every metric is logged once per epoch; at step intervals Lightning would only write
        # the epoch number to MLflow (a database write mid-epoch): never
        log_every_n_steps=2**31 - 1,
        logger=logger,
        callbacks=callbacks,
        default_root_dir=root_dir,
    )


def train(
    cfg: DictConfig,
    overrides: Sequence[str] = (),
    *,
    entry_point: str = "cnnstudy-train",
    extra_tags: dict[str, str] | None = None,
    root_dir: str | None = None,
    tracking_uri: str | None = None,
) -> RunResult:
    """Train the network `cfg` describes, log one MLflow run, return its metrics.

    Every check that can fail runs before the data is loaded and before the MLflow run
    exists: config and shape plan, data files, the tracking store, memory, then (torch
    imported) the optimizer and scheduler and the accelerator. SIGINT and SIGTERM during
    the run mark it KILLED and raise Interrupted. `tracking_uri` overrides
    MLFLOW_TRACKING_URI and logger.tracking_uri.
    """
    cfg = resolve(cfg)
    layers = check(cfg)
    rank = srun_rank(cfg)  # several machines: srun's tasks, rank 0 the one that records
    check_files(cfg.data)
    uri = store.tracking_uri(cfg, tracking_uri)
    store.check_store(uri)
    _check_memory(layers, cfg)
    cfg.logger.tracking_uri = uri  # the store used is the one recorded (redacted)
    started = time.perf_counter()
    with (
        _isolated_globals(cfg.trainer.num_threads),
        warnings.catch_warnings(),
        signals_interrupt(),
    ):
        for pattern in _EXPECTED_WARNINGS:
            warnings.filterwarnings("ignore", message=pattern)
        import torch

        # Flush denormal floats to zero, as TensorFlow and XLA do on CPUs: Adam's squared
        # gradients of tiny gradients are denormal, and x86 cores take a slow path on each
        # (half of fused Adam's time on MNIST from the second epoch). Set before the first
        # parallel region, so that torch's worker threads, created then, inherit it; not
        # restored, so that every run in the process computes alike.
        torch.set_flush_denormal(True)
        # what needs torch to check, checked before Lightning and MLflow are imported (2 s)
        hardware = resolve_hardware(cfg)
        if hardware.gpu:
            _check_memory(layers, cfg, gpu=True)
        optimizer, scheduler = optimizer_factories(cfg)

        import lightning as L
        import mlflow
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        from cnnstudy.data.batches import ImageDataModule
        from cnnstudy.network.modules import build_network
        from cnnstudy.run.classifier import Classifier, RunLogger, SignalCheck, Throughput

        _quiet_lightning(hardware.gpu)
        if not hardware.gpu and os.environ.get("CUDA_VISIBLE_DEVICES") is None:
            # A CUDA build of torch on a machine without a GPU asks NVML for the device count
            # at every optimizer step (dlopen included): a quarter millisecond a step. With no
            # GPU in use, say so; the variable is restored when the run ends.
            os.environ["CUDA_VISIBLE_DEVICES"] = ""
        datamodule = ImageDataModule(cfg.data, seed=cfg.seed, channels_last=hardware.channels_last)
        splits = datamodule.prepare()
        raise_if_signalled()  # nothing in MLflow yet: stop here
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        network = build_network(layers, cpu_kernels=cfg.trainer.cpu_kernels)
        if hardware.channels_last:
            network = network.to(memory_format=torch.channels_last)
        if cfg.data.task == "regression":  # targets standardized by the training split's
            from cnnstudy.run.classifier import Regressor

            targets = splits.train.labels.double()
            std = float(targets.std()) if len(targets) > 1 else 1.0
            system = Regressor(network, float(targets.mean()), std, optimizer, scheduler)
        else:
            system = Classifier(network, cfg.data.num_classes, optimizer, scheduler)
        if rank:  # another machine's process of a multi-node run: it trains, rank 0 records
            return _follow(cfg, hardware, system, datamodule, root_dir, started, uri)

        mlflow.set_tracking_uri(uri)
        experiment_id = store.open_experiment(
            uri, cfg.logger.experiment_name, cfg.logger.artifact_location
        )
        if context.current() is None:  # a study ends its own processes' runs (loop.py)
            mark_orphans(uri, by=f"{entry_point} (pid {os.getpid()})")
        tags = run_tags(cfg, list(overrides), entry_point)
        request = context.current() or context.RunRequest()
        tags.update(extra_tags or {})
        tags.update(request.tags)
        tags.update(process_tags())
        parent = cfg.logger.parent_run_id or request.parent_run_id
        if parent:  # the tag works across processes, unlike start_run's own nesting
            tags["mlflow.parentRunId"] = parent
        tags.update(
            {
                "cnnstudy.torch_threads": str(torch.get_num_threads()),
                "cnnstudy.precision": hardware.precision,
                "cnnstudy.channels_last": str(hardware.channels_last).lower(),
                "cnnstudy.cpu_kernels": _cpu_kernels(cfg, hardware),
                "cnnstudy.data_fingerprint": splits.fingerprint,
                "cnnstudy.data_loaded_from": splits.loaded_from,
            }
        )
        name = request.run_name or run_name(cfg, list(overrides))
        with mlflow.start_run(experiment_id=experiment_id, run_name=name, tags=tags) as run:
            run_id = request.run_id = run.info.run_id
            try:
                record_setup(cfg, layers, splits, datamodule.mean, datamodule.std, uri)
                if cfg.data.task == "regression":  # what the output unit is scaled by
                    mlflow.log_params(
                        {
                            "data.target_mean": system.target_mean,
                            "data.target_std": system.target_std,
                        }
                    )
                raise_if_signalled()
                counts = totals(layers)
                logger = RunLogger(
                    experiment_name=cfg.logger.experiment_name, tracking_uri=uri, run_id=run_id
                )
                throughput = Throughput()
                callbacks = [throughput, SignalCheck(raise_if_signalled), *request.callbacks]
                trainer = _trainer(cfg, hardware, logger, callbacks, root_dir or os.getcwd())
                fit_started = time.perf_counter()
                with stop_ranks_on_signal(trainer), diverged_in_a_process():
                    trainer.fit(system, datamodule=datamodule)  # DDP: a signal stops all
                fit_seconds = time.perf_counter() - fit_started
                metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
                for callback in request.callbacks:  # a DDP trial pruned in its processes
                    getattr(callback, "raise_if_stopped", lambda: None)()
                tester = trainer
                if trainer.world_size > 1:  # the test set in this process, on one device
                    from cnnstudy.run.classifier import _leave_process_group

                    _leave_process_group()  # srun's processes: the others are done
                    one = OmegaConf.merge(
                        cfg, {"trainer": {"devices": 1, "num_nodes": 1, "progress_bar": False}}
                    )
                    tester = _trainer(one, hardware, logger, [], root_dir or os.getcwd())
                for result in tester.test(system, datamodule=datamodule, verbose=False):
                    metrics.update({k: float(v) for k, v in result.items()})
                metrics["time/fit_s"] = fit_seconds
                mlflow.log_metric("time/fit_s", fit_seconds)
                metrics.update(
                    {"model/params": counts["params"], "model/connections": counts["connections"]}
                )
                wanted = request.pictures_if is not None and request.pictures_if(metrics)
                if wanted:
                    mlflow.set_tag("cnnstudy.pictures", "the study's best so far")
                if cfg.logger.log_images or wanted:
                    from cnnstudy.run.pictures import log_pictures

                    target = getattr(system, "target_mean", None)
                    target = None if target is None else (target, system.target_std)
                    loader = datamodule.test_dataloader()
                    drawn = log_pictures(network, loader, splits.classes, target)
                    mlflow.log_metric("time/pictures_s", drawn)
                    metrics["time/pictures_s"] = drawn
                if cfg.logger.log_model:
                    _log_network(network, cfg)
                raise_if_signalled()
            except (Interrupted, SIGTERMException) as caught:
                # Lightning notes SIGTERM too and may stop first, with its own SystemExit
                # (exit code 0): either way, the signal that arrived
                stop = caught if isinstance(caught, Interrupted) else interrupted_by(SIGTERM)
                mlflow.set_tag("cnnstudy.killed_reason", f"{stop} during the run")
                mlflow.end_run("KILLED")
                raise stop from None
            except Diverged as err:  # a result of the config, not a bug: no traceback
                mlflow.set_tag("cnnstudy.fail_reason", str(err))
                mlflow.end_run("FAILED")
                raise
            except Stopped as stop:  # a study's pruner: over, on purpose, not failed
                mlflow.set_tag("cnnstudy.trial_state", stop.state)
                mlflow.set_tag("cnnstudy.stopped_reason", str(stop))
                mlflow.set_tag("cnnstudy.epochs_trained", str(stop.epochs))
                mlflow.end_run("KILLED")
                raise
    samples = {1: "series", 2: "images", 3: "volumes"}[dims_of(cfg.data)]
    return RunResult(run_id, experiment_id, uri, metrics, time.perf_counter() - started, samples)


def _follow(
    cfg: DictConfig,
    hardware: Hardware,
    system: Any,
    datamodule: Any,
    root_dir: str | None,
    started: float,
    uri: str,
) -> RunResult:
    """A process of rank > 0 in a run on several machines: its share of the fit, with no
    MLflow run of its own (rank 0 records the run, its metrics summed over every
    process); the test set is rank 0's, after the fit."""
    from cnnstudy.run.classifier import SignalCheck, _leave_process_group

    callbacks = [SignalCheck(raise_if_signalled)]
    trainer = _trainer(cfg, hardware, False, callbacks, root_dir or os.getcwd())
    with diverged_in_a_process():
        trainer.fit(system, datamodule=datamodule)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    _leave_process_group()
    return RunResult("", "", uri, metrics, time.perf_counter() - started)


@contextlib.contextmanager
def diverged_in_a_process() -> Iterator[None]:
    """A DDP process whose loss diverged raises Diverged there; Lightning re-raises it here
    as torch's ProcessRaisedException, the process's traceback as its text: Diverged
    again, with its line, as in one process."""
    try:
        yield
    except Exception as err:
        said = f"{Diverged.__module__}.Diverged: "
        text = str(err)
        if said not in text or isinstance(err, Diverged):
            raise
        raise Diverged(text.split(said, 1)[1].splitlines()[0]) from None


def _log_network(network: Any, cfg: DictConfig) -> None:
    """The trained network as a torch.export archive (no pickled code) plus its state dict."""
    from importlib import metadata

    import mlflow
    import torch

    network = network.eval().to("cpu", memory_format=torch.contiguous_format)
    example = torch.zeros(2, cfg.data.channels, *input_size(cfg.data))
    mlflow.pytorch.log_model(
        network,
        name="model",
        input_example=example.numpy(),
        pip_requirements=[f"torch=={metadata.version('torch')}"],
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "state_dict.pt"
        torch.save(network.state_dict(), path)
        mlflow.log_artifact(str(path), "weights")


def summary(result: RunResult) -> str:
    from cnnstudy.redact import redact_text
    from cnnstudy.run.dashboard import run_link, served_note

    m = result.metrics
    nan = float("nan")
    if "test/rmse" in m:
        scores = f"test/rmse {m['test/rmse']:.4g}  test/mae {m.get('test/mae', nan):.4g}  " + (
            f"test/r2 {m.get('test/r2', nan):.4f}"
        )
    else:
        scores = f"test/acc {m.get('test/acc', nan):.4f}  test/loss {m.get('test/loss', nan):.4f}"
    return (
        f"{scores}"
        f"  params {int(m.get('model/params', 0)):,}"
        f"  {m.get('train/images_per_s', 0):,.0f} {result.samples}/s"
        f"  time {result.seconds:.1f} s\n"
        f"MLflow run {result.run_id} (experiment {result.experiment_id}) in "
        f"{redact_text(result.tracking_uri)}\n"
        f"See it: {run_link(result.tracking_uri, result.experiment_id, result.run_id)}"
        f"{served_note(result.tracking_uri)}"
    )


def _remove_job_folder(output_dir: str) -> None:
    """A job stopped by a config error trained nothing: its Hydra folder (and the date
    folder above it, when that is left empty) goes too."""
    import shutil

    folder = Path(output_dir)
    shutil.rmtree(folder, ignore_errors=True)
    for parent in list(folder.parents)[:2]:
        try:
            parent.rmdir()  # only when empty
        except OSError:
            break


@hydra.main(config_path=str(CONFIG_DIR), config_name="train", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> dict[str, float] | None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra_cfg = HydraConfig.get()
    overrides = list(hydra_cfg.overrides.task)
    try:
        result = train(cfg, overrides, root_dir=hydra_cfg.runtime.output_dir)
    except Diverged as err:
        if context.current() is not None:
            raise  # a study's trial: it fails with the reason
        report(f"{err}; the run is marked FAILED")
        if hydra_cfg.mode != RunMode.MULTIRUN:
            sys.exit(1)
        _failed_jobs.append(" ".join(override_secret(o) for o in overrides))
        return None
    except ConfigError as err:
        request = context.current()
        if request is not None and request.raise_config_errors:
            raise  # a study's trial: the sweeper records the reason on the trial
        report(err)
        if hydra_cfg.mode != RunMode.MULTIRUN:
            _remove_job_folder(hydra_cfg.runtime.output_dir)
            sys.exit(EXIT_USER_ERROR)
        _failed_jobs.append(" ".join(override_secret(o) for o in overrides))  # the sweep goes on
        return None
    if context.current() is None and result.run_id:  # a study prints a line per trial instead
        get_log().info(summary(result))  # (and of a multi-node run's processes, rank 0)
    return result.metrics


_failed_jobs: list[str] = []  # multirun jobs stopped by a config error, reported at the end


def main() -> None:
    """cnnstudy-train. Exit codes: 0 done, 2 a user error (config, data files, store; in a
    multirun, any job's), 130 Ctrl-C, 143 SIGTERM (the run is marked KILLED)."""
    import logging
    import os

    # a tracking server's client prints "View run ... at:" itself; cnnstudy says "See it:"
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    for name in ("hydra", "hydra._internal.core_plugins.basic_launcher"):
        logging.getLogger(name).addFilter(RedactingFilter())  # Hydra prints jobs' overrides
    shows = {"--cfg", "-c", "--info", "-i", "--resolve", "--package", "-p"}
    if {"-m", "--multirun"} & set(sys.argv) and shows & {a.split("=")[0] for a in sys.argv}:
        # Hydra refuses -m with --cfg/--info (a traceback): the config of the study's jobs
        sys.argv = [a for a in sys.argv if a not in ("-m", "--multirun")]
        get_log().warning("cnnstudy: -m dropped: Hydra shows the config of a job, not a sweep")
    try:
        _hydra_main()
    except Interrupted as stop:
        get_log().error(f"cnnstudy: stopped by {stop}; the run is marked KILLED")
        sys.exit(stop.exit_code)
    if _failed_jobs:
        get_log().error(
            f"cnnstudy: error: {len(_failed_jobs)} job(s) of the sweep failed (above): "
            f"{'; '.join(_failed_jobs)}"
        )
        sys.exit(EXIT_USER_ERROR)


cli = console_script(main)

if __name__ == "__main__":
    main()
