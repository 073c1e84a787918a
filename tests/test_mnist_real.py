"""Real MNIST from ../shared/data/MNIST/raw. Skipped where it is absent, unless
CNNSTUDY_REQUIRE_MNIST=1 (set by .ci/run): in CI the data must be there."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from cnnstudy.config.compose import compose
from cnnstudy.data.splits import load_splits

from .conftest import train_cli

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
RAW = SHARED / "MNIST" / "raw"

if not (RAW / "train-images-idx3-ubyte").is_file():
    if os.environ.get("CNNSTUDY_REQUIRE_MNIST") == "1":
        pytest.fail(f"CNNSTUDY_REQUIRE_MNIST=1 but real MNIST is not in {RAW}", pytrace=False)
    pytest.skip(
        f"real MNIST not found in {RAW} (set CNNSTUDY_REQUIRE_MNIST=1 to fail instead)",
        allow_module_level=True,
    )


def snapshot() -> dict[str, tuple[int, float]]:
    return {p.name: (p.stat().st_size, p.stat().st_mtime) for p in SHARED.rglob("*") if p.is_file()}


def test_files_are_the_published_ones():
    lines = (RAW / "SHA256SUMS").read_text().splitlines()
    sums = dict(line.split()[::-1] for line in lines if line)
    for name, digest in sums.items():
        path = RAW / name.lstrip("*")
        if path.is_file():
            assert hashlib.sha256(path.read_bytes()).hexdigest() == digest, name


def test_real_mnist_splits(tmp_path):
    before = snapshot()
    splits = load_splits(
        compose(["data=mnist", f"data.root={SHARED}", f"data.cache_dir={tmp_path}"]).data
    )
    assert (len(splits.train), len(splits.val), len(splits.test)) == (54_000, 6_000, 10_000)
    assert splits.train.images.shape[1:] == (1, 32, 32)
    assert splits.test.labels[:2].tolist() == [7, 2]  # MNIST's first two test digits
    assert splits.test.images[:, :, :2].max() == 0 and splits.test.images.max() == 255
    assert snapshot() == before  # nothing written into data.root


@pytest.mark.slow
def test_real_mnist_trains_and_logs_its_data(tmp_path):
    _, (run,) = train_cli(
        tmp_path,
        "data=mnist",
        f"data.root={SHARED}",
        "trainer=smoke",
        "trainer.limit_train_batches=60",
        "trainer.limit_test_batches=20",
        "logger.log_model=false",
    )
    assert run.data.metrics["test/acc"] > 0.85  # 60 batches of real digits already learn a lot
    assert run.data.params["data.train_size"] == "54000"
    assert run.data.params["data.root"] == str(SHARED.resolve())
    mean = float(run.data.params["data.train_mean"].strip("[]"))
    assert 25.0 < mean < 26.0  # MNIST: 0.1307 * 255 = 33.3 over 28x28, so 25.5 over 32x32 padded
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"mnist-train", "mnist-val", "mnist-test"}
    assert inputs["mnist-train"].dataset.digest
    assert {t.value for t in inputs["mnist-test"].tags} == {"testing"}
    assert run.data.tags["cnnstudy.precision"] == "32-true"
    assert run.data.tags["cnnstudy.channels_last"] == "true"
    from cnnstudy.network.cpu_kernels import build

    built = build()  # the run's process built the kernels into the same cache, or could not
    kernels = run.data.tags["cnnstudy.cpu_kernels"]
    if built.library is not None:
        assert kernels == "maxpool"
    else:
        assert kernels.startswith("torch's max pool: ")
