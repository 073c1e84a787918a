"""Training throughput of the seed network, three ways, in one process.

    python benchmarks/throughput.py                      # digits (bundled), 5 epochs, batch 128
    python benchmarks/throughput.py --epochs 10 --batch-size 512 --no-channels-last

(a) the baseline: cnnstudy's training step in a plain PyTorch loop over the same in-memory
    uint8 tensors (shuffle-gather, slice, standardize, forward, loss and accuracy sums,
    backward, optimizer and scheduler step, as the config sets them);
(b) cnnstudy-train's own path: `cnnstudy.train.train(cfg)`, Lightning and MLflow included,
    its images/s read from the run (training batches only, as in (a));
(c) the tutorial pipeline: a torchvision dataset (ImageFolder over the digits written as
    PNG files) + per-sample transforms + DataLoader.
Prints images/second (medians over alternating rounds of (a) and (b)) and ratios
against (a). Nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


def timed_epochs(net, opt, batches, epochs: int, device: str = "cpu", memory_format=None) -> float:
    """Images per second of plain training steps over `batches`, `epochs` times."""
    import torch
    from torch.nn import functional as F

    images, seconds = 0, 0.0
    for _ in range(epochs):
        start = time.perf_counter()
        for x, y in batches:
            x = x.to(device, non_blocking=True)
            if memory_format is not None:
                x = x.contiguous(memory_format=memory_format)
            y = y.to(device, non_blocking=True)
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            images += len(y)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds += time.perf_counter() - start
    return images / seconds


def plain_loop(
    cfg, splits, layers, mean, std, epochs: int, device: str = "cpu", bare: bool = False
) -> float:
    """(a): cnnstudy's training step in a plain loop over the same in-memory tensors.

    The same network, batches, loss, per-epoch loss and accuracy sums (`classify`), and
    the optimizer and per-batch schedule that `cfg` names: only Lightning, the callbacks
    and MLflow are missing. Images per second of the training batches.
    bare=True, (a0): forward, loss, backward and optimizer step only, no schedule and no
    loss or accuracy sums: less work than cnnstudy does, shown for comparison.
    """
    import torch
    from torch.nn import functional as F

    from cnnstudy.data.batches import TensorBatches
    from cnnstudy.data.splits import Split
    from cnnstudy.network.modules import build_network
    from cnnstudy.run.classifier import Totals, classify
    from cnnstudy.run.train import optimizer_factories, resolve_hardware

    channels_last = resolve_hardware(cfg).channels_last
    torch.manual_seed(cfg.seed)
    net = build_network(layers).to(device)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    shape = (1, -1, *[1] * (splits.train.images.dim() - 2))  # per channel, any axes
    train = Split(splits.train.images.to(device), splits.train.labels.to(device))
    batches = TensorBatches(
        train,
        cfg.data.batch_size,
        torch.tensor(mean, device=device).view(shape),
        torch.tensor(std, device=device).view(shape),
        shuffle=True,
        channels_last=channels_last,
    )
    make_optimizer, make_scheduler = optimizer_factories(cfg)
    opt = make_optimizer(net.parameters())
    scheduler = make_scheduler(opt, epochs * len(batches)) if make_scheduler else None
    if bare:
        scheduler = None
    images, seconds = 0, 0.0
    for _ in range(epochs):
        totals = Totals()
        start = time.perf_counter()
        for x, y in batches:
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(net(x), y) if bare else classify(net, (x, y), totals)
            loss.backward()
            opt.step()
            if scheduler is not None:
                scheduler.step()
            images += len(y)
        if not bare:
            totals.as_tensor().tolist()  # the epoch's loss and accuracy, read once
        seconds += time.perf_counter() - start
    return images / seconds


def like_a_run(cpu: bool) -> None:
    """The process settings a cnnstudy run makes, made before (a) and (c) run too.

    Call before torch is imported: with no GPU in use, a CUDA build of torch would query
    NVML at every optimizer step; denormals flush to zero from the first parallel region.
    """
    if cpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    import warnings

    # numpy's, when a library imports it after flush-to-zero is on (as in a run): harmless
    warnings.filterwarnings("ignore", message="The value of the smallest subnormal")
    import torch

    torch.set_flush_denormal(True)


def store_overrides(store: Path) -> list[str]:
    """cnnstudy-train settings of every benchmark run: a store of its own, no progress bar."""
    return [
        "trainer.progress_bar=false",
        "logger.log_model=false",
        f"logger.tracking_uri=sqlite:///{store}/mlflow.db",
        f"logger.artifact_location={store}/artifacts",
        "logger.experiment_name=benchmark",
    ]


def run_overrides(store: Path, epochs: int, batch_size: int, channels_last: bool) -> list[str]:
    return [
        f"data.batch_size={batch_size}",
        f"trainer.max_epochs={epochs}",
        f"trainer.channels_last={channels_last}",
        *store_overrides(store),
    ]


def cnnstudy_path(cfg) -> tuple[float, float]:
    """(b): images/s of the training batches, and of the whole fit (validation included)."""
    from cnnstudy.run.train import train

    os.environ.pop("MLFLOW_TRACKING_URI", None)
    result = train(cfg, ["benchmark"])
    fit_rate = cfg.trainer.max_epochs * train_size(cfg) / result.metrics["time/fit_s"]
    return result.metrics["train/images_per_s"], fit_rate


def train_size(cfg) -> int:
    from cnnstudy.data.splits import load_splits

    return len(load_splits(cfg.data).train)


def tutorial_pipeline(
    splits, mean, std, epochs: int, batch_size: int, layers, workers: int
) -> float:
    """ImageFolder of PNG files + Resize/ToTensor/Normalize + DataLoader, as in tutorials."""
    import torch
    from PIL import Image
    from torchvision import datasets, transforms

    from cnnstudy.network.modules import build_network

    with tempfile.TemporaryDirectory() as tmp:
        for i, (img, label) in enumerate(
            zip(splits.train.images, splits.train.labels, strict=True)
        ):
            folder = Path(tmp) / str(int(label))
            folder.mkdir(exist_ok=True)
            Image.fromarray(img[0].numpy(), mode="L").save(folder / f"{i}.png")
        tf = transforms.Compose(
            [
                transforms.Grayscale(),
                transforms.Resize((32, 32)),
                transforms.ToTensor(),
                transforms.Normalize([m / 255 for m in mean], [s / 255 for s in std]),
            ]
        )
        dataset = datasets.ImageFolder(tmp, transform=tf)
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=True,
            num_workers=workers,
            persistent_workers=workers > 0,
        )
        torch.manual_seed(0)
        net = build_network(layers)
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        return timed_epochs(net, opt, loader, epochs)


def warm_up(layers, batch_size: int) -> None:
    """First calls pay for oneDNN kernel selection; pay it before anything is timed."""
    import torch
    from torch.nn import functional as F

    from cnnstudy.network.modules import build_network

    net = build_network(layers)
    for _ in range(5):
        x = torch.randn(batch_size, 1, 32, 32)
        F.cross_entropy(net(x), torch.zeros(batch_size, dtype=torch.long)).backward()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5, help="epochs per way (default: 5)")
    parser.add_argument("--batch-size", type=int, default=128, help="batch size (default: 128)")
    parser.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="NHWC for (a) and (b), as cnnstudy's default trainer.channels_last=auto (default: on)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="alternating rounds of (a) and (b); medians are reported (default: 3)",
    )
    parser.add_argument(
        "--workers", type=int, default=0, help="DataLoader workers in (c) (default 0)"
    )
    args = parser.parse_args()
    like_a_run(cpu=True)

    import torch

    from cnnstudy.config.compose import compose
    from cnnstudy.data.batches import ImageDataModule
    from cnnstudy.network.plan import plan

    with tempfile.TemporaryDirectory() as store:
        cfg = compose(run_overrides(Path(store), args.epochs, args.batch_size, args.channels_last))
        layers = plan(cfg.model, cfg.data)
        dm = ImageDataModule(cfg.data)
        splits = dm.prepare()
        print(
            f"seed network, digits train split ({len(splits.train)} images, 32x32x1), "
            f"{args.epochs} epochs, batch {args.batch_size}, "
            f"channels_last={args.channels_last}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads",
            flush=True,
        )
        warm_up(layers, args.batch_size)
        a_runs, a0_runs, b_runs, fit_runs = [], [], [], []
        for _ in range(args.rounds):  # alternate the ways, so drifts in machine speed hit all
            rate, fit = cnnstudy_path(cfg)
            b_runs.append(rate)
            fit_runs.append(fit)
            a_runs.append(plain_loop(cfg, splits, layers, dm.mean, dm.std, args.epochs))
            a0_runs.append(plain_loop(cfg, splits, layers, dm.mean, dm.std, args.epochs, bare=True))
    a, a0, b, b_fit = (statistics.median(r) for r in (a_runs, a0_runs, b_runs, fit_runs))
    print(f"rounds of (a):  {', '.join(f'{r:,.0f}' for r in a_runs)}")
    print(f"rounds of (a0): {', '.join(f'{r:,.0f}' for r in a0_runs)}")
    print(f"rounds of (b):  {', '.join(f'{r:,.0f}' for r in b_runs)}")
    c = tutorial_pipeline(
        splits, dm.mean, dm.std, args.epochs, args.batch_size, layers, args.workers
    )

    rows = [
        ("(a) plain PyTorch loop, in-memory tensors", a),
        ("(a0) the same, bare: no schedule, no loss/accuracy sums", a0),
        ("(b) cnnstudy-train path (training batches)", b),
        ("    cnnstudy-train path (whole fit, validation included)", b_fit),
        ("(c) torchvision ImageFolder + transforms + DataLoader", c),
    ]
    print(f"{'way':58s} {'images/s':>10s} {'vs (a)':>8s}")
    for name, rate in rows:
        print(f"{name:58s} {rate:10,.0f} {rate / a:8.2f}")
    print(
        f"(b)/(a) = {b / a:.3f}  (goal: at least 0.90);  (b)/(a0) = {b / a0:.3f};  "
        f"(b)/(c) = {b / c:.2f}"
    )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
