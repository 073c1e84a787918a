"""What the per-run pictures cost (logger.log_images): the same training run with them on
and off, alternated, in one process (imports and first-call costs paid before timing).

    python benchmarks/pictures.py                     # digits, 3 epochs, 5 rounds
    python benchmarks/pictures.py --mnist             # real MNIST from ../shared/data too

Prints per dataset the median wall time of a run (train() returns it) with and without
the pictures, their ratio, and the median of the run's own `time/pictures_s`. Nothing is
asserted.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import store_overrides  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def measure(name: str, data: list[str], rounds: int, store: Path) -> None:
    from cnnstudy.config.compose import compose
    from cnnstudy.run.train import train

    seconds: dict[bool, list[float]] = {False: [], True: []}
    drawing: list[float] = []
    for k in range(rounds + 1):  # round 0 warms up both paths
        for on in (False, True):
            overrides = [*data, *store_overrides(store), f"logger.log_images={on}"]
            result = train(compose(overrides), overrides)
            if k:
                seconds[on].append(result.seconds)
                if on:
                    drawing.append(result.metrics.get("time/pictures_s", float("nan")))
    off, on = statistics.median(seconds[False]), statistics.median(seconds[True])
    print(
        f"{name}: run {off:.2f} s without pictures, {on:.2f} s with them "
        f"({on / off:.2f}x); pictures {statistics.median(drawing):.3f} s a run "
        f"(median of {rounds} rounds)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--mnist", action="store_true", help="real MNIST too")
    args = parser.parse_args()
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    with tempfile.TemporaryDirectory() as folder:
        store = Path(folder)
        budget = [f"trainer.max_epochs={args.epochs}", "trainer.progress_bar=false"]
        measure("digits", budget, args.rounds, store)
        if args.mnist:
            measure(
                "MNIST",
                ["data=mnist", f"data.root={SHARED}", "trainer.max_epochs=1"],
                args.rounds,
                store,
            )


if __name__ == "__main__":
    main()
