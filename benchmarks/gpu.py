"""cnnstudy on a GPU: images/s against a plain PyTorch loop, time to 99.0% on MNIST, and
the wall time of a 100-trial study (`make bench-gpu`).

    .venv/bin/python benchmarks/gpu.py                       # on a machine with a CUDA GPU
    .venv/bin/python benchmarks/gpu.py --root /data --trials 100
    .venv/bin/python benchmarks/gpu.py --accelerator cpu --quick   # the same path, checked on a CPU

1. images/s of one epoch of MNIST (32x32, padded), medians over alternating rounds, for
   three networks: the seed network (10@5x5, 200 hidden units), LeNet-5 (model=lenet5)
   and a 32/64-filter 3x3 network (2 stages, padding 1, 128 hidden units): (a) cnnstudy's
   training step in a plain PyTorch loop on the same device over the same tensors, (b)
   `cnnstudy-train`'s path with `trainer=gpu` (bf16 mixed precision where the GPU has it,
   channels-last, TF32, data on the GPU);
2. time to 99.0% MNIST test accuracy: the fastest network the CPU study found
   (docs/findings.md: 2 stages of 8 then 16 5x5 filters, 44 hidden units, 4 epochs),
   epoch by epoch, with the fit time at the first epoch whose test accuracy is 99.0%;
3. the wall time of a `cnnstudy-train -m sweep=hidden_units data=mnist trainer=gpu`
   study of N trials (one epoch each), whole command, and its time per trial.
Nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import like_a_run, plain_loop, store_overrides  # noqa: E402

ROOT_DEFAULT = Path(__file__).resolve().parents[2] / "shared" / "data"
BIN = Path(sys.executable).parent
NETWORKS = {
    "seed network": [],
    "LeNet-5": ["model=lenet5"],
    "32/64 filters 3x3": [
        "model.stages=2",
        "model.filters=32",
        "model.filter_growth=2.0",
        "model.receptive_field=3",
        "model.padding=1",
        "model.hidden_units=128",
    ],
}
FASTEST = [  # docs/findings/run.sh confirm: 99.15-99.21% test accuracy on 2 CPU cores
    "model.stages=2",
    "model.filters=8",
    "model.filter_growth=2.0",
    "model.receptive_field=5",
    "model.padding=1",
    "model.hidden_units=44",
    "optimizer.lr=0.01254872656592939",
]


def speeds(run: list[str], device: str, rounds: int) -> None:
    from cnnstudy.config.compose import compose
    from cnnstudy.data.batches import ImageDataModule
    from cnnstudy.network.plan import plan
    from cnnstudy.run.train import train

    print(f"\n{'network':20s} {'(a) plain loop':>16s} {'(b) cnnstudy':>14s} {'(b)/(a)':>8s}")
    for name, model in NETWORKS.items():
        cfg = compose([*run, *model, "trainer.max_epochs=1"])
        layers = plan(cfg.model, cfg.data)
        dm = ImageDataModule(cfg.data)
        splits = dm.prepare()
        a_runs, b_runs = [], []
        for _ in range(rounds):
            result = train(cfg, ["benchmark"])
            b_runs.append(result.metrics["train/images_per_s"])
            a_runs.append(plain_loop(cfg, splits, layers, dm.mean, dm.std, 1, device))
        a, b = statistics.median(a_runs), statistics.median(b_runs)
        print(f"{name:20s} {a:16,.0f} {b:14,.0f} {b / a:8.2f}", flush=True)


def time_to_accuracy(run: list[str], epochs: int, target: float = 0.99) -> None:
    from cnnstudy.config.compose import compose
    from cnnstudy.run.train import train

    for epochs_run in range(1, epochs + 1):
        result = train(compose([*run, *FASTEST, f"trainer.max_epochs={epochs_run}"]), ["bench"])
        acc, fit = result.metrics["test/acc"], result.metrics["time/fit_s"]
        print(
            f"the fastest CPU network, {epochs_run} epoch(s): test/acc {acc:.4f} after "
            f"{fit:.1f} s of training",
            flush=True,
        )
        if acc >= target:
            print(f"time to {target:.1%} MNIST test accuracy: {fit:.1f} s ({epochs_run} epochs)")
            return
    print(f"{target:.1%} not reached in {epochs} epochs")


def study(run: list[str], trials: int, where: Path) -> None:
    argv = [
        str(BIN / "cnnstudy-train"),
        "-m",
        "sweep=hidden_units",
        *run,
        "trainer.max_epochs=1",
        f"hydra.sweeper.n_trials={trials}",
        f"hydra.sweeper.storage=sqlite:///{where}/optuna.db",
        "hydra.sweeper.study_name=gpu-bench",
    ]
    started = time.perf_counter()
    done = subprocess.run(argv, cwd=where, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(done.stderr[-3000:])
    print(
        f"a {trials}-trial study (one epoch of MNIST each), whole command: {seconds:.1f} s, "
        f"{seconds / trials:.2f} s a trial"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=str(ROOT_DEFAULT), help="data.root for MNIST")
    parser.add_argument("--accelerator", default="gpu", choices=["gpu", "cpu"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=8, help="most epochs tried for 99.0%")
    parser.add_argument(
        "--quick", action="store_true", help="a few batches per epoch: checks the path only"
    )
    args = parser.parse_args()
    like_a_run(cpu=args.accelerator == "cpu")
    import torch

    device = "cuda" if args.accelerator == "gpu" else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA GPU here; --accelerator cpu runs the same path on this CPU")
    where = Path(tempfile.mkdtemp(prefix="cnnstudy-gpu-bench-"))
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    run = [
        "data=mnist",
        f"data.root={args.root}",
        f"data.cache_dir={where}/cache",
        "trainer=gpu" if device == "cuda" else "trainer.accelerator=cpu",
        *store_overrides(where),
        "logger.log_images=false",
    ]
    if args.quick:
        run += [
            "trainer.limit_train_batches=5",
            "trainer.limit_val_batches=2",
            "trainer.limit_test_batches=2",
        ]
        args.rounds, args.trials, args.epochs = 1, 3, 1
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"{name}, torch {torch.__version__}", flush=True)
    speeds(run, device, args.rounds)
    time_to_accuracy(run, args.epochs)
    study(
        [r for r in run if not r.startswith("logger.tracking_uri")]
        + [f"logger.tracking_uri=sqlite:///{where}/study.db"],
        args.trials,
        where,
    )


if __name__ == "__main__":
    main()
