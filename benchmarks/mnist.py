"""The seed network on real MNIST (32x32, padded): speed, data loading and accuracy, one run.

    python benchmarks/mnist.py                          # data.root=../shared/data
    python benchmarks/mnist.py --root /data --rounds 5 --accelerator gpu

Prints, measured in this process (and two child processes for the data load):
- this machine's practical float32 peak: the best of several large matrix multiplies;
- the data load, cold (decode IDX files with torchvision, write cnnstudy's cache) and
  warm (read the cache), each in a fresh process;
- training images/second, one epoch each, medians over alternating rounds:
  (a) cnnstudy's training step in a plain PyTorch loop over the same in-memory tensors
      (same batch, memory format, optimizer and schedule), and (a0) the same loop bare,
      without the schedule and the loss and accuracy sums,
  (b) cnnstudy-train's path (`cnnstudy.train.train`, Lightning and MLflow included),
  (c) torchvision's MNIST dataset + Pad/ToTensor/Normalize transforms + DataLoader;
  with the ratios, and (b)'s training FLOP rate as a share of the matmul peak;
- test accuracy of cnnstudy's default settings after 1 and after 3 epochs.
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
from throughput import (  # noqa: E402
    like_a_run,
    plain_loop,
    store_overrides,
    timed_epochs,
    warm_up,
)

ROOT_DEFAULT = Path(__file__).resolve().parents[2] / "shared" / "data"


def matmul_peak(device: str, n: int = 2048, repeats: int = 10) -> float:
    """Best float32 GFLOP/s over `repeats` n x n matrix multiplies."""
    import torch

    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    best = float("inf")
    for _ in range(repeats + 2):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        (a @ b).sum().item()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def training_flops_per_image(layers) -> float:
    """Forward + weight gradients + input gradients (none for the first layer), 2 per MAC."""
    macs = [
        (layer.connections - layer.connections // layer.weights_per_neuron)
        if layer.weight_shape
        else 0
        for layer in layers
    ]
    weighted = [m for m in macs if m]
    return 2 * (3 * sum(weighted) - weighted[0])


def load_time(overrides: list[str]) -> tuple[float, bool]:
    """Seconds for load_splits in a fresh process, and whether it came from the cache."""
    code = (
        "import time\nfrom cnnstudy.config.compose import compose\n"
        "from cnnstudy.data.splits import load_splits\n"
        f"cfg = compose({overrides!r})\n"
        "start = time.perf_counter()\ns = load_splits(cfg.data)\n"
        "print(time.perf_counter() - start, s.loaded_from == 'cache')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    seconds, cached = out.stdout.split()[-2:]
    return float(seconds), cached == "True"


def tutorial_pipeline(
    root: str, layers, batch_size: int, workers: int, device: str, as_cnnstudy: bool
) -> float:
    """torchvision.datasets.MNIST + transforms + DataLoader, one epoch.

    as_cnnstudy=False: the whole tutorial: conv -> ReLU -> pool written out, torch's default
    Adam, NCHW. as_cnnstudy=True: the same data pipeline feeding cnnstudy's network,
    optimizer settings and memory format, so that only the data path differs from (a).
    """
    import torch
    from torch import nn
    from torchvision import datasets, transforms

    from cnnstudy.network.modules import build_network

    tf = transforms.Compose(
        [
            transforms.Pad(2),
            transforms.ToTensor(),
            transforms.Normalize((0.1000,), (0.2752,)),
        ]
    )
    dataset = datasets.MNIST(root, train=True, download=False, transform=tf)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        pin_memory=device == "cuda",
    )
    torch.manual_seed(0)
    memory_format = torch.channels_last if as_cnnstudy else torch.contiguous_format
    if as_cnnstudy:
        net = build_network(layers).to(device, memory_format=memory_format)
        opt = torch.optim.Adam(net.parameters(), lr=1e-3, fused=True)
    else:
        net = nn.Sequential(
            nn.Conv2d(1, 10, 5),
            nn.ReLU(),
            nn.MaxPool2d(2, 2),
            nn.Flatten(),
            nn.Linear(1960, 200),
            nn.ReLU(),
            nn.Linear(200, 10),
        ).to(device)
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    return timed_epochs(net, opt, loader, 1, device, memory_format)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--root", default=str(ROOT_DEFAULT), help=f"data.root (default {ROOT_DEFAULT})"
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="alternating rounds of (a), (a0), (b)"
    )
    parser.add_argument(
        "--batch-size", type=int, default=None, help="batch size (default: data=mnist's, 256)"
    )
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers in (c)")
    parser.add_argument("--accelerator", default="cpu", choices=["cpu", "gpu"])
    parser.add_argument("--skip-accuracy", action="store_true", help="skip the 3-epoch run")
    args = parser.parse_args()
    like_a_run(cpu=args.accelerator == "cpu")

    import torch

    from cnnstudy.config.compose import compose
    from cnnstudy.data.batches import ImageDataModule
    from cnnstudy.network.plan import plan
    from cnnstudy.run.train import resolve_hardware, train

    device = "cuda" if args.accelerator == "gpu" else "cpu"
    if args.batch_size is None:
        args.batch_size = compose(["data=mnist"]).data.batch_size
    workdir = Path(tempfile.mkdtemp(prefix="cnnstudy-bench-"))
    data = [
        "data=mnist",
        f"data.root={args.root}",
        f"data.batch_size={args.batch_size}",
        f"data.cache_dir={workdir}/cache",
    ]
    run = [*data, f"trainer.accelerator={args.accelerator}", *store_overrides(workdir)]
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    cfg = compose(run)
    layers = plan(cfg.model, cfg.data)
    hardware = resolve_hardware(cfg)
    name = (
        torch.cuda.get_device_name()
        if device == "cuda"
        else f"CPU, {torch.get_num_threads()} threads"
    )
    print(
        f"seed network on MNIST 32x32 (padded), batch {args.batch_size}, {name}, "
        f"precision {hardware.precision}, channels_last={hardware.channels_last}, "
        f"torch {torch.__version__}",
        flush=True,
    )

    peak = matmul_peak(device, n=8192 if device == "cuda" else 2048)
    print(f"matmul peak (float32): {peak:,.1f} GFLOP/s", flush=True)

    cold, cached_cold = load_time(data)
    warm, cached_warm = load_time(data)
    print(
        f"data load: cold {cold:.2f} s (from cache: {cached_cold}), "
        f"warm {warm:.2f} s (from cache: {cached_warm}), cold/warm {cold / warm:.0f}x",
        flush=True,
    )

    dm = ImageDataModule(cfg.data)
    splits = dm.prepare()
    if device == "cpu":
        warm_up(layers, args.batch_size)
    a_runs, a0_runs, b_runs, accuracy_1 = [], [], [], None
    for _ in range(args.rounds):
        one_epoch = compose([*run, "trainer.max_epochs=1"])
        result = train(one_epoch, ["benchmark"])
        b_runs.append(result.metrics["train/images_per_s"])
        accuracy_1 = result.metrics["test/acc"]
        a_runs.append(plain_loop(one_epoch, splits, layers, dm.mean, dm.std, 1, device))
        a0_runs.append(plain_loop(one_epoch, splits, layers, dm.mean, dm.std, 1, device, bare=True))
        print(
            f"round: (a) {a_runs[-1]:,.0f}  (a0) {a0_runs[-1]:,.0f}  (b) {b_runs[-1]:,.0f} "
            "images/s",
            flush=True,
        )
    c = tutorial_pipeline(args.root, layers, args.batch_size, args.workers, device, False)
    c2 = tutorial_pipeline(args.root, layers, args.batch_size, args.workers, device, True)
    a, a0, b = (statistics.median(r) for r in (a_runs, a0_runs, b_runs))
    accuracy_3 = None
    if not args.skip_accuracy:
        three = train(compose([*run, "trainer.max_epochs=3"]), ["benchmark"])
        accuracy_3 = three.metrics["test/acc"]

    flops = training_flops_per_image(layers)
    print(f"\n{'way':66s} {'images/s':>10s} {'vs (a)':>7s} {'vs (c)':>7s}")
    for label, rate in (
        ("(a) plain PyTorch loop, in-memory tensors", a),
        ("(a0) the same, bare: no schedule, no loss/accuracy sums", a0),
        ("(b) cnnstudy-train path", b),
        ("(c) tutorial: torchvision MNIST + transforms + DataLoader", c),
        ("(c') the same DataLoader feeding cnnstudy's network and optimizer", c2),
    ):
        print(f"{label:66s} {rate:10,.0f} {rate / a:7.2f} {rate / c:7.2f}")
    achieved = b * flops / 1e9
    print(
        f"\ntraining FLOPs per image: {flops / 1e6:.2f} M; cnnstudy achieves "
        f"{achieved:,.1f} GFLOP/s = {achieved / peak:.1%} of the matmul peak"
    )
    three = "skipped" if accuracy_3 is None else f"{accuracy_3:.4f}"
    print(
        f"test accuracy, default settings: after 1 epoch {accuracy_1:.4f}, after 3 epochs {three}"
    )
    print(
        f"(b)/(a) {b / a:.2f}; (b)/(a0) {b / a0:.2f}; (b)/(c) {b / c:.1f}; (b)/(c') {b / c2:.1f}; "
        f"FLOP share {achieved / peak:.1%}; warm load {warm:.2f} s"
    )


if __name__ == "__main__":
    main()
