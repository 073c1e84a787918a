"""Real data: torchvision datasets from files, image folders, standardization, splits, cache,
augmentation. The data is made by the tests (datamaker.py); real MNIST has its own file."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from cnnstudy.config.compose import compose
from cnnstudy.data import splits as splits_module
from cnnstudy.data.batches import shift_and_flip
from cnnstudy.data.sources import fit
from cnnstudy.data.splits import channel_stats, decode_key, load_splits
from cnnstudy.errors import ConfigError

from .conftest import run_cli, train_cli
from .datamaker import write_folder, write_idx


def data_cfg(*overrides: str):
    return compose(list(overrides)).data


# ---------------------------------------------------------------- torchvision datasets


@pytest.mark.parametrize(
    ("name", "folder"),
    [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST"), ("kmnist", "KMNIST")],
)
def test_torchvision_dataset_reads_idx_files_and_pads_to_32(tmp_path, name, folder):
    write_idx(tmp_path, folder)
    before = sorted(p.name for p in (tmp_path / folder / "raw").iterdir())
    splits = load_splits(
        data_cfg(f"data={name}", f"data.root={tmp_path}", f"data.cache_dir={tmp_path}/c")
    )
    assert (len(splits.train), len(splits.val), len(splits.test)) == (270, 30, 100)
    assert splits.train.images.shape[1:] == (1, 32, 32)
    assert splits.train.images.dtype == torch.uint8
    border = torch.cat(
        [splits.test.images[..., :2, :].flatten(), splits.test.images[..., :, :2].flatten()]
    )
    assert border.max() == 0  # 28x28 padded by 2 on every side
    assert splits.classes and len(splits.classes) == 10
    assert sorted(p.name for p in (tmp_path / folder / "raw").iterdir()) == before  # root untouched


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "kmnist", "cifar10"])
def test_missing_files_offline_name_the_files_and_folder(tmp_path, name):
    result = run_cli("cnnstudy-train", f"data={name}", f"data.root={tmp_path}", cwd=tmp_path)
    assert result.returncode == 2
    message = result.stderr
    assert "Traceback" not in message and message.startswith("cnnstudy: error: ")
    expected = {
        "mnist": "MNIST/raw",
        "fashion_mnist": "FashionMNIST/raw",
        "kmnist": "KMNIST/raw",
        "cifar10": "cifar-10-batches-py",
    }[name]
    assert f"{tmp_path}/{expected}" in message
    files = (
        ("data_batch_1", "test_batch")
        if name == "cifar10"
        else ("train-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    )
    for file in files:
        assert file in message
    assert "data.download=true" in message


@pytest.mark.parametrize(
    ("file", "damage", "words"),
    [
        ("train-labels-idx1-ubyte", "empty", ["0 bytes, not an IDX file"]),
        ("train-images-idx3-ubyte", "truncate", ["bytes where its header promises 235,216"]),
    ],
)
def test_damaged_idx_files_are_named_with_sizes_and_a_remedy(tmp_path, file, damage, words):
    raw = write_idx(tmp_path)  # 300 training images: 16 + 300 * 28 * 28 = 235,216 bytes
    path = raw / file
    path.write_bytes(b"" if damage == "empty" else path.read_bytes()[:100_000])
    result = run_cli("cnnstudy-train", "data=mnist", f"data.root={tmp_path}", cwd=tmp_path)
    assert result.returncode == 2
    message = result.stderr.strip()
    assert "Traceback" not in message and message.count("\n") == 0
    assert f"{path} is damaged" in message
    for word in words:
        assert word in message
    assert "download failed" not in message and "data.download=true" in message
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "outputs").exists()


# ---------------------------------------------------------------- image folders


def test_folder_with_bad_files_is_rejected_naming_them(tmp_path):
    bad = write_folder(tmp_path / "images")
    with pytest.raises(ConfigError) as err:
        load_splits(
            data_cfg("data=folder", f"data.path={tmp_path}/images", f"data.cache_dir={tmp_path}/c")
        )
    message = str(err.value)
    assert str(bad["corrupt"]) in message and str(bad["truncated"]) in message
    assert "data.bad_images=skip" in message


def test_folder_skips_bad_files_when_told_and_lists_them(tmp_path):
    bad = write_folder(tmp_path / "images")
    splits = load_splits(
        data_cfg(
            "data=folder",
            f"data.path={tmp_path}/images",
            "data.bad_images=skip",
            f"data.cache_dir={tmp_path}/c",
        )
    )
    assert sorted(s.split(":")[0] for s in splits.skipped) == sorted(map(str, bad.values()))
    assert len(splits.train) + len(splits.val) + len(splits.test) == 18  # 3 classes x 6 good images
    assert splits.classes == ["circle", "square", "stripe"]
    assert splits.train.images.shape[1:] == (1, 32, 32)


def test_folder_colour_images_keep_three_channels(tmp_path):
    write_folder(tmp_path / "images", bad=False)
    splits = load_splits(
        data_cfg(
            "data=folder",
            f"data.path={tmp_path}/images",
            "data.channels=3",
            "data.height=24",
            "data.width=40",
            f"data.cache_dir={tmp_path}/c",
        )
    )
    assert splits.train.images.shape[1:] == (3, 24, 40)


@pytest.mark.parametrize(
    ("layout", "words"),
    [
        ("empty_class", ["no images", "empty"]),
        ("one_class", ["1 class folder", "at least 2"]),
        ("missing", ["not a folder"]),
    ],
)
def test_folder_layout_errors(tmp_path, layout, words):
    root = tmp_path / "images"
    if layout == "empty_class":
        write_folder(root, bad=False)
        (root / "empty").mkdir()
    elif layout == "one_class":
        write_folder(root, bad=False)
        for extra in ("square", "stripe"):
            for f in (root / extra).iterdir():
                f.unlink()
            (root / extra).rmdir()
    result = run_cli("cnnstudy-describe", "data=folder", f"data.path={root}", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    for word in words:
        assert word in result.stderr


def test_folder_class_count_sets_the_output_layer(tmp_path):
    write_folder(tmp_path / "images", bad=False)
    result = run_cli(
        "cnnstudy-describe", "--json", "data=folder", f"data.path={tmp_path}/images", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert '"out_shape": [\n        3\n      ]' in result.stdout


@pytest.mark.parametrize("how", ["resize", "pad", "resize_pad"])
def test_fit_brings_any_size_to_the_input(how):
    cfg = data_cfg(f"data.fit={how}", "data.height=32", "data.width=32")
    image = torch.full((1, 1, 20, 40), 200.0)
    out = fit(image, cfg)
    assert out.shape == (1, 1, 32, 32) and out.dtype == torch.uint8
    if how == "resize":
        assert (out == 200).all()
    elif how == "pad":  # centred, 40 wide cropped to 32, 20 high padded by 6 each side
        assert (out[..., 6:26, :] == 200).all() and (out[..., :6, :] == 0).all()
    else:  # scaled to 16x32 keeping the 1:2 aspect, then padded by 8 above and below
        assert (out[..., 8:24, :] == 200).all() and (out[..., :8, :] == 0).all()


# ---------------------------------------------------------------- standardization, splits, cache


def test_channel_stats_are_exact():
    images = torch.randint(0, 256, (50, 3, 7, 9), dtype=torch.uint8)
    mean, std = channel_stats(images)
    ref = images.double().transpose(0, 1).reshape(3, -1)
    assert mean == pytest.approx(ref.mean(1).tolist(), abs=1e-9)
    assert std == pytest.approx(ref.std(1).tolist(), abs=1e-9)


def test_splits_depend_on_split_seed_only(tmp_path):
    write_idx(tmp_path)
    base = ("data=mnist", f"data.root={tmp_path}", f"data.cache_dir={tmp_path}/c")
    a = load_splits(data_cfg(*base))
    b = load_splits(data_cfg(*base, "seed=7"))
    c = load_splits(data_cfg(*base, "data.split_seed=1"))
    assert a.fingerprint == b.fingerprint
    assert a.fingerprint != c.fingerprint
    assert a.test.fingerprint == c.test.fingerprint  # MNIST's own test split never moves
    assert torch.equal(a.val.labels, b.val.labels)


def test_decoded_data_is_cached_outside_the_data_root(tmp_path):
    write_idx(tmp_path / "root")
    cache = tmp_path / "cache"
    args = ("data=mnist", f"data.root={tmp_path}/root", f"data.cache_dir={cache}")
    code = (
        "from cnnstudy.config.compose import compose\n"
        "from cnnstudy.data.splits import load_splits\n"
        f"s = load_splits(compose({list(args)!r}).data)\n"
        f"again = load_splits(compose({list(args)!r}).data)\n"
        "print('FROM', s.loaded_from, again.loaded_from, s.fingerprint)\n"
    )
    first = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    second = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    _, cached1, memory1, fp1 = first.stdout.split()
    _, cached2, memory2, fp2 = second.stdout.split()
    assert (cached1, cached2) == ("decoded", "cache")
    assert memory1 == memory2 == "memory"  # the second call in a process: its own source
    assert fp1 == fp2
    assert len(list(cache.glob("mnist-*.pt"))) == 1
    assert not list((tmp_path / "root").rglob("*.pt"))
    # other preprocessing, or changed files, is another cache entry
    assert decode_key(data_cfg(*args)) != decode_key(data_cfg(*args, "data.height=28"))
    key = decode_key(data_cfg(*args))
    write_idx(tmp_path / "root", n_train=310)
    assert decode_key(data_cfg(*args)) != key


# ---------------------------------------------------------------- augmentation


def test_shift_moves_each_image_by_at_most_the_shift():
    x = torch.zeros(64, 1, 9, 9, dtype=torch.uint8)
    x[:, :, 4, 4] = 255
    out = shift_and_flip(x, 2, False, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == torch.uint8
    positions = (out[:, 0] == 255).nonzero()[:, 1:]
    assert len(positions) == 64
    assert ((positions - 4).abs() <= 2).all()
    assert len({tuple(p.tolist()) for p in positions}) > 5  # per-image, not one shift for all


def test_flip_mirrors_about_half_the_images():
    x = torch.arange(10, dtype=torch.uint8).view(1, 1, 1, 10).repeat(200, 1, 1, 1)
    out = shift_and_flip(x, 0, True, torch.Generator().manual_seed(0))
    flipped = (out == x.flip(-1)).all(dim=(1, 2, 3))
    assert ((out == x).all(dim=(1, 2, 3)) | flipped).all()
    assert 60 < int(flipped.sum()) < 140


def test_hardware_follows_the_device_on_cpu():
    from cnnstudy.run.train import resolve_hardware

    assert resolve_hardware(compose(["trainer.accelerator=cpu"])).precision == "32-true"
    assert resolve_hardware(compose([])).channels_last is True
    assert resolve_hardware(compose(["model=mlp"])).channels_last is False
    fixed = resolve_hardware(
        compose(["trainer.precision=bf16-mixed", "trainer.channels_last=false"])
    )
    assert (fixed.precision, fixed.channels_last) == ("bf16-mixed", False)


def test_val_and_test_batches_use_the_training_statistics(tmp_path):
    from cnnstudy.data.batches import ImageDataModule

    write_idx(tmp_path)
    dm = ImageDataModule(
        data_cfg("data=mnist", f"data.root={tmp_path}", f"data.cache_dir={tmp_path}/c")
    )
    dm.setup()
    mean, std = channel_stats(dm.splits.train.images)
    assert (dm.mean, dm.std) == (mean, std)
    for loader, split in (
        (dm.val_dataloader(), dm.splits.val),
        (dm.test_dataloader(), dm.splits.test),
    ):
        x, _ = next(iter(loader))
        expected = (split.images[: len(x)].float() - mean[0]) / std[0]
        torch.testing.assert_close(x, expected)


@pytest.mark.slow
def test_training_on_a_folder_lists_the_skipped_files_in_the_run(tmp_path):
    import mlflow

    bad = write_folder(tmp_path / "images")
    _, (run,) = train_cli(
        tmp_path,
        "data=folder",
        f"data.path={tmp_path}/images",
        "data.bad_images=skip",
        "data.channels=3",
        "trainer=smoke",
        "logger.log_model=false",
    )
    skipped = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/skipped_images.txt")
    assert str(bad["corrupt"]) in skipped and str(bad["truncated"]) in skipped
    data = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/data.json")
    assert data["classes"] == ["circle", "square", "stripe"] and len(data["mean"]) == 3
    assert run.data.params["data.num_classes"] == "3"
    assert run.data.metrics["model/params"] == (
        10 * (5 * 5 * 3 + 1) + (14 * 14 * 10 + 1) * 200 + 201 * 3
    )


def test_training_statistics_are_counted_once_per_loaded_data(tmp_path, monkeypatch):
    from cnnstudy.data import splits as data
    from cnnstudy.data.batches import ImageDataModule

    write_idx(tmp_path)
    cfg = data_cfg("data=mnist", f"data.root={tmp_path}", f"data.cache_dir={tmp_path}/c")
    first = ImageDataModule(cfg)
    first.prepare()
    monkeypatch.setattr(data, "channel_stats", lambda images: pytest.fail("counted again"))
    second = ImageDataModule(cfg)  # the next run in this process, on the same data
    second.prepare()
    assert (second.mean, second.std) == (first.mean, first.std)
    second.mean[0] = -1.0  # each run's own lists: changing one leaves the memo alone
    assert ImageDataModule(cfg).prepare().train_stats()[0] == first.mean


def test_a_subset_of_classes_is_relabelled_and_sizes_the_output_layer():
    """data.classes=[3, 7]: only those digits, labelled 0 and 1 in every split; the output
    layer has 2 units (data.num_classes=0: counted), and a count that disagrees is an
    error naming the fix."""
    from cnnstudy.config.check import check, resolve
    from cnnstudy.errors import ConfigError

    full = load_splits(resolve(compose([])).data)
    cfg = compose(["data.classes=[3,7]", "data.num_classes=0"])
    layers = check(cfg)
    assert layers[-1].name == "output" and layers[-1].outputs == 2
    two = load_splits(resolve(cfg).data)
    assert two.classes == ["3", "7"]
    for (_, part), (_, whole) in zip(two.items(), full.items(), strict=True):
        assert set(part.labels.tolist()) == {0, 1}
        assert len(part) == int(((whole.labels == 3) | (whole.labels == 7)).sum())
    assert two.fingerprint != full.fingerprint
    with pytest.raises(ConfigError, match=r"data.num_classes=10: data.classes keeps 2 classes"):
        check(compose(["data.classes=[3,7]"]))
    with pytest.raises(ConfigError, match=r"data.classes=\[3, 17\]: this dataset has 10"):
        load_splits(resolve(compose(["data.classes=[3,17]", "data.num_classes=0"])).data)
    splits_module._memo.clear()  # later tests in this process load the digits afresh
