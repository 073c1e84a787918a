"""Training throughput of the seed network, three ways, in one process.

    python benchmarks/throughput.py                      # digits (bundled), 5 epochs, batch 128
    python benchmarks/throughput.py --epochs 10 --batch-size 512 --no-channels-last

(a) plain PyTorch loop over the same in-memory uint8 tensors (shuffle-gather, slice,
    standardize, forward, backward, step): the baseline;
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
    splits,
    layers,
    mean,
    std,
    epochs: int,
    batch_size: int,
    channels_last: bool,
    device: str = "cpu",
) -> float:
    import torch

    from cnnstudy.data import Split, TensorBatches
    from cnnstudy.model import build_network

    torch.manual_seed(0)
    net = build_network(layers).to(device)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, fused=True)  # as conf/optimizer/adam.yaml
    shape = (1, -1, 1, 1)
    train = Split(splits.train.images.to(device), splits.train.labels.to(device))
    batches = TensorBatches(
        train,
        batch_size,
        torch.tensor(mean, device=device).view(shape),
        torch.tensor(std, device=device).view(shape),
        shuffle=True,
        channels_last=channels_last,
    )
    return timed_epochs(net, opt, batches, epochs, device)


def cnnstudy_path(
    data_overrides: list[str], epochs: int, batch_size: int, channels_last: bool, store: Path
) -> tuple[float, float]:
    from cnnstudy.config import compose
    from cnnstudy.train import train

    cfg = compose(
        [
            *data_overrides,
            f"data.batch_size={batch_size}",
            f"trainer.max_epochs={epochs}",
            f"trainer.channels_last={channels_last}",
            "trainer.progress_bar=false",
            "logger.log_model=false",
            f"logger.tracking_uri=sqlite:///{store}/mlflow.db",
            f"logger.artifact_location={store}/artifacts",
            "logger.experiment_name=benchmark",
        ]
    )
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    result = train(cfg, ["benchmark"])
    fit_rate = epochs * train_size(cfg) / result.metrics["time/fit_s"]
    return result.metrics["train/images_per_s"], fit_rate


def train_size(cfg) -> int:
    from cnnstudy.data import load_splits

    return len(load_splits(cfg.data).train)


def tutorial_pipeline(
    splits, mean, std, epochs: int, batch_size: int, layers, workers: int
) -> float:
    """ImageFolder of PNG files + Resize/ToTensor/Normalize + DataLoader, as in tutorials."""
    import torch
    from PIL import Image
    from torchvision import datasets, transforms

    from cnnstudy.model import build_network

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

    from cnnstudy.model import build_network

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

    import torch

    from cnnstudy.architecture import plan
    from cnnstudy.config import compose
    from cnnstudy.data import ImageDataModule

    cfg = compose([])
    layers = plan(cfg.model, cfg.data)
    dm = ImageDataModule(cfg.data)
    splits = dm.prepare()
    print(
        f"seed network, digits train split ({len(splits.train)} images, 32x32x1), "
        f"{args.epochs} epochs, batch {args.batch_size}, channels_last={args.channels_last}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads",
        flush=True,
    )
    warm_up(layers, args.batch_size)

    a_runs, b_runs, fit_runs = [], [], []
    with tempfile.TemporaryDirectory() as store:
        for _ in range(args.rounds):  # alternate the ways, so drifts in machine speed hit both
            rate, fit = cnnstudy_path(
                [], args.epochs, args.batch_size, args.channels_last, Path(store)
            )
            b_runs.append(rate)
            fit_runs.append(fit)
            a_runs.append(
                plain_loop(
                    splits,
                    layers,
                    dm.mean,
                    dm.std,
                    args.epochs,
                    args.batch_size,
                    args.channels_last,
                )
            )
    a, b, b_fit = (statistics.median(runs) for runs in (a_runs, b_runs, fit_runs))
    print(f"rounds of (a): {', '.join(f'{r:,.0f}' for r in a_runs)}")
    print(f"rounds of (b): {', '.join(f'{r:,.0f}' for r in b_runs)}")
    c = tutorial_pipeline(
        splits, dm.mean, dm.std, args.epochs, args.batch_size, layers, args.workers
    )

    rows = [
        ("(a) plain PyTorch loop, in-memory tensors", a),
        ("(b) cnnstudy-train path (training batches)", b),
        ("    cnnstudy-train path (whole fit, validation included)", b_fit),
        ("(c) torchvision ImageFolder + transforms + DataLoader", c),
    ]
    print(f"{'way':58s} {'images/s':>10s} {'vs (a)':>8s}")
    for name, rate in rows:
        print(f"{name:58s} {rate:10,.0f} {rate / a:8.2f}")
    print(f"(b)/(a) = {b / a:.3f}  (goal: at least 0.90);  (b)/(c) = {b / c:.2f}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
