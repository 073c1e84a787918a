"""1D and 3D: cnnstudy's training path against a plain PyTorch loop, and each new
dataset's load, cold and warm, in one process.

    python benchmarks/dimensions.py                     # sequential MNIST (1D), Moving MNIST (3D)
    python benchmarks/dimensions.py --epochs 3 --rounds 3 --root ../shared/data

For each dimensionality, (a) the plain loop of benchmarks/throughput.py (the same
network, in-memory tensors, batches, loss sums, optimizer and schedule; no Lightning,
no MLflow) and (b) `cnnstudy.run.train.train(cfg)`, its training samples per second read
from the run; medians over alternating rounds, and (b)/(a) (goal: at least 0.90).
Then each new data source's `load_splits`: cold (decoded from its files into an empty
cache), warm (from the cache on disk, as the next process reads it) and in memory (the
next run in the same process). Nothing is asserted.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import cnnstudy_path, like_a_run, plain_loop, store_overrides  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"

CASES = {
    "1D: sequential MNIST, 784x1 sequences": [
        "data=sequential_mnist",
        "model.receptive_field=9",
        "model.stride=2",
    ],
    "3D: Moving MNIST, 8x40x40x1 clips (sweep=clip_time's network)": [
        "data=moving_mnist",
        "data.clips=1200",
        "data.depth=8",
        "data.height=40",
        "data.width=40",
        "data.batch_size=32",
        "model.stages=2",
        "model.filters=8",
        "model.receptive_field=[3,5,5]",
        "model.padding=same",
        "model.pool_size=2",
        "model.pool_stride=2",
        "model.hidden_units=64",
    ],
}


def throughput(name: str, overrides: list[str], args, store: Path) -> tuple[float, float]:
    from cnnstudy.config.check import resolve
    from cnnstudy.config.compose import compose
    from cnnstudy.data.batches import ImageDataModule
    from cnnstudy.network.plan import plan

    cfg = resolve(
        compose(
            [
                *overrides,
                f"data.root={args.root}",
                f"trainer.max_epochs={args.epochs}",
                "trainer.num_threads=0",
                *store_overrides(store),
            ]
        )
    )
    layers = plan(cfg.model, cfg.data)
    dm = ImageDataModule(cfg.data)
    splits = dm.prepare()
    print(f"{name}: {len(splits.train):,} training samples, {args.epochs} epochs", flush=True)
    plain_loop(cfg, splits, layers, dm.mean, dm.std, 1)  # warm-up: kernel selection
    a_runs, b_runs = [], []
    for _ in range(args.rounds):
        b_runs.append(cnnstudy_path(cfg)[0])
        a_runs.append(plain_loop(cfg, splits, layers, dm.mean, dm.std, args.epochs))
    a, b = statistics.median(a_runs), statistics.median(b_runs)
    print(f"  (a) plain loop   {', '.join(f'{r:,.0f}' for r in a_runs)}  median {a:,.0f}/s")
    print(f"  (b) cnnstudy     {', '.join(f'{r:,.0f}' for r in b_runs)}  median {b:,.0f}/s")
    print(f"  (b)/(a) = {b / a:.3f}  (goal: at least 0.90)", flush=True)
    return a, b


def loads(args, folder: Path) -> list[tuple[str, float, float, float]]:
    import numpy as np
    from omegaconf import OmegaConf

    from cnnstudy.config.check import resolve
    from cnnstudy.config.compose import compose
    from cnnstudy.data import splits as splits_module
    from cnnstudy.data.files import ucr_problems

    rng = np.random.default_rng(0)
    x = rng.normal(size=(2000, 3, 150)).astype(np.float32)
    np.savez(folder / "series.npz", x_train=x, y_train=np.arange(2000) % 4)
    gunpoint = ucr_problems()["GunPoint"]
    tsv = folder / "GunPoint_TRAIN.tsv"
    from aeon.datasets import load_from_ts_file

    xs, ys = load_from_ts_file(str(gunpoint / "GunPoint_TRAIN.ts"))
    tsv.write_text(
        "".join(f"{y}\t" + "\t".join(map(str, s[0])) + "\n" for s, y in zip(xs, ys, strict=True))
    )
    sources = {
        "ucr GunPoint (50 + 150 x 150)": ["data=ucr"],
        "ucr BasicMotions (40 + 40 x 100x6)": ["data=ucr", "data.problem=BasicMotions"],
        "ucr JapaneseVowels, padded (270 + 370 x 29x12)": [
            "data=ucr",
            "data.problem=JapaneseVowels",
            "data.unequal=pad",
        ],
        "ucr Covid3Month, regression (140 + 61 x 84)": [
            "data=ucr",
            "data.problem=Covid3Month",
        ],
        "csv (GunPoint's 50 training rows)": ["data=csv", f"data.path={tsv}", "data.length=150"],
        "npz (2,000 x 150x3)": [
            "data=npz",
            f"data.path={folder / 'series.npz'}",
            "data.length=150",
            "data.channels=3",
        ],
        "sequential_mnist (60,000 + 10,000 x 784)": ["data=sequential_mnist"],
        "moving_mnist (1,200 + 200 clips, 8x40x40)": [
            "data=moving_mnist",
            "data.clips=1200",
            "data.depth=8",
            "data.height=40",
            "data.width=40",
        ],
    }
    rows = []
    for name, overrides in sources.items():
        cache = folder / f"cache-{len(rows)}"
        cfg = resolve(compose([*overrides, f"data.root={args.root}", f"data.cache_dir={cache}"]))
        data = OmegaConf.to_container(cfg.data)
        times = []
        for _ in ("cold", "warm"):
            splits_module._memo.clear()
            started = time.perf_counter()
            splits_module.load_splits(OmegaConf.create(data))
            times.append(time.perf_counter() - started)
        started = time.perf_counter()
        splits_module.load_splits(OmegaConf.create(data))
        times.append(time.perf_counter() - started)
        rows.append((name, *times))
        print(f"  {name:50s} {times[0]:7.3f} {times[1]:7.3f} {times[2]:8.4f}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2, help="epochs per way (default: 2)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (default: 3)")
    parser.add_argument("--root", default=str(SHARED), help="the folder holding MNIST/raw")
    parser.add_argument("--only", choices=("speed", "load"), help="one half of the benchmark")
    args = parser.parse_args()
    like_a_run(cpu=True)
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    with tempfile.TemporaryDirectory() as folder:
        if args.only != "load":
            for name, overrides in CASES.items():
                throughput(name, overrides, args, Path(folder))
        if args.only != "speed":
            print(f"\n  {'data load, seconds':50s} {'cold':>7s} {'warm':>7s} {'memory':>8s}")
            loads(args, Path(folder))


if __name__ == "__main__":
    main()
