"""1D and 3D inputs: the same keys, arithmetic, describe table and errors as for images,
against hand-computed tables and torch's own output shapes; the user's arrays and
sequential MNIST through cnnstudy-train."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from cnnstudy.config.check import check, resolve
from cnnstudy.config.compose import compose
from cnnstudy.errors import ConfigError
from cnnstudy.network.plan import totals

from .conftest import SHARED, SMOKE, need_real_mnist, run_cli, train_cli

SEQUENCE = ["data.length=150", "data.height=null", "data.width=null", "data.channels=3"]
VOLUME = ["data.depth=16", "data.height=28", "data.width=28", "data.channels=1"]
SEQUENCE_CONV = ["model.receptive_field=7", "model.stride=2", "model.padding=1"]


def _arrays(path: Path, x_shape: tuple[int, ...], classes: int = 4, seed: int = 0) -> Path:
    """Arrays whose classes are learnable: each class adds its own offset."""
    rng = np.random.default_rng(seed)
    n = x_shape[0]
    y = np.arange(n) % classes
    x = rng.normal(size=x_shape).astype(np.float32)
    x += y.reshape(-1, *([1] * (len(x_shape) - 1))) * 1.5
    n_test = n // 4
    np.savez(path, x_train=x[n_test:], y_train=y[n_test:], x_test=x[:n_test], y_test=y[:n_test])
    return path


def _npz(path: Path, *axes: str) -> list[str]:
    return ["data=npz", f"data.path={path}", *axes]


def _layers(*overrides: str) -> dict:
    cfg = resolve(compose(list(overrides)))
    return {layer.name: layer for layer in check(cfg)}


def test_a_1d_network_against_a_hand_computed_table(tmp_path):
    path = _arrays(tmp_path / "s.npz", (40, 3, 150))
    layers = _layers(
        *_npz(path, *SEQUENCE),
        "model.filters=8",
        *SEQUENCE_CONV,
        "model.pool_size=3",
        "model.pool_stride=3",
        "model.hidden_layers=0",
    )
    conv, pool, flat = layers["conv1"], layers["pool1"], layers["flatten"]
    assert conv.formula == "floor((150 - 7 + 2*1) / 2) + 1 = 73"
    assert conv.out_shape == (8, 73) and conv.weight_shape == (8, 3, 7)
    assert conv.weights_per_neuron == 7 * 3 + 1 and conv.params == 22 * 8
    assert conv.connections == 22 * 8 * 73 and conv.input_field == 7
    assert pool.formula == "floor((73 - 3 + 2*0) / 3) + 1 = 24"
    assert pool.out_shape == (8, 24) and pool.connections == 3 * 8 * 24
    assert pool.input_field == 7 + 2 * 2
    assert flat.out_shape == (192,) and flat.formula == "24*8 = 192"
    assert layers["output"].weight_shape == (4, 192)


def test_a_3d_network_with_a_field_per_axis_against_a_hand_computed_table(tmp_path):
    path = _arrays(tmp_path / "v.npz", (8, 1, 16, 28, 28))
    layers = _layers(
        *_npz(path, "data.length=null", *VOLUME),
        "model.filters=4",
        "model.receptive_field=[3,5,5]",
        "model.padding=[1,0,0]",
        "model.pool_size=[1,2,2]",
        "model.pool_stride=[1,2,2]",
        "model.hidden_layers=0",
    )
    conv, pool = layers["conv1"], layers["pool1"]
    assert conv.receptive_field == (3, 5, 5) and conv.padding == (1, 0, 0) and conv.stride == 1
    assert conv.formula == (
        "D: floor((16 - 3 + 2*1) / 1) + 1 = 16; H: floor((28 - 5 + 2*0) / 1) + 1 = 24; "
        "W: floor((28 - 5 + 2*0) / 1) + 1 = 24"
    )
    assert conv.out_shape == (4, 16, 24, 24) and conv.weight_shape == (4, 1, 3, 5, 5)
    assert conv.weights_per_neuron == 76 and conv.params == 304
    assert conv.connections == 76 * 4 * 16 * 24 * 24 and conv.input_field == (3, 5, 5)
    assert pool.out_shape == (4, 16, 12, 12) and pool.connections == 4 * 4 * 16 * 12 * 12
    assert pool.input_field == (3, 6, 6)
    assert layers["flatten"].out_shape == (16 * 12 * 12 * 4,)
    assert totals(list(layers.values()))["params"] == 304 + (9216 + 1) * 4


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_the_plan_gives_torchs_own_output_shapes(dims):
    """Every output shape of the plan equals the module's, for a grid of fields, strides,
    paddings and pools (and fields that differ per axis), in 1D, 2D and 3D."""
    import torch

    from cnnstudy.network.modules import build_network

    arrays = ["data.name=npz", "data.path=never-read.npz"]  # the arithmetic reads no file
    data = {
        1: [*arrays, "data.length=23", "data.height=null", "data.width=null"],
        2: ["data.height=13", "data.width=11"],
        3: [*arrays, "data.depth=7", "data.height=9", "data.width=8"],
    }[dims]
    fields = [1, 2, 3, 5] + ([[3, 1, 2]] if dims == 3 else [[2, 3]] if dims == 2 else [])
    cfg = compose([*data, "model.filters=2", "model.hidden_layers=0"])  # composed once
    checked = 0
    for f, s, p, (pool, pool_stride) in itertools.product(
        fields, [1, 2, 3], [0, 1, 2], [("none", 1), ("max", 2), ("avg", 3)]
    ):
        if (p * 2 >= (min(f) if isinstance(f, list) else f)) and p > 0:
            continue  # torch refuses padding over half the window
        overrides = dict(receptive_field=f, stride=s, padding=p, pool=pool, pool_size=pool_stride)
        overrides["pool_stride"] = pool_stride
        for key, value in overrides.items():
            cfg.model[key] = value
        try:
            layers = check(cfg)
        except ConfigError:
            continue  # a map smaller than the window: the plan says so (tested below)
        net = build_network(layers)
        shapes = {}
        for name, module in net.named_children():
            module.register_forward_hook(
                lambda m, i, o, name=name, shapes=shapes: shapes.__setitem__(
                    name, tuple(o.shape[1:])
                )
            )
        net(torch.zeros(2, *layers[0].in_shape))
        for layer in layers[1:]:
            assert shapes[layer.name] == layer.out_shape, (overrides, layer.name)
        assert sum(t.numel() for t in net.parameters()) == totals(layers)["params"]
        checked += 1
    assert checked > 40


def test_a_field_too_large_on_one_axis_names_the_axis_and_its_formula(tmp_path):
    path = _arrays(tmp_path / "v.npz", (8, 1, 2, 28, 28))
    done = run_cli(
        "cnnstudy-describe",
        *_npz(path, "data.length=null", "data.depth=2", "data.height=28", "data.width=28"),
        "model.receptive_field=[3,5,5]",
        cwd=tmp_path,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    message = done.stderr.strip()
    assert message.count("\n") == 0
    for words in (
        "model.receptive_field=[3, 5, 5]: conv1",
        "gets a 2x28x28x1 input",
        "D: floor((2 - 3 + 2*0) / 1) + 1 = 0",
        "below 1 on axis D",
        "a window of at most 2 on axis D",
    ):
        assert words in message, message
    sequences = _arrays(tmp_path / "s.npz", (40, 3, 150))
    wrong = run_cli(
        "cnnstudy-describe", *_npz(sequences, *SEQUENCE), "model.stride=[1,2]", cwd=tmp_path
    )
    assert wrong.returncode == 2
    assert "model.stride=[1, 2]: the input has 1 axis (L)" in wrong.stderr
    image = run_cli("cnnstudy-describe", "data.length=100", cwd=tmp_path)
    assert image.returncode == 2
    assert "data.height=32: cannot take effect: data.length=100" in image.stderr
    digits = run_cli("cnnstudy-describe", *SEQUENCE, cwd=tmp_path)
    assert "data=digits holds 2D images" in digits.stderr
    small = run_cli("cnnstudy-describe", "data=moving_mnist", "data.height=20", cwd=tmp_path)
    assert small.returncode == 2 and "data.height=20: a frame holds a 28x28 digit" in small.stderr


def test_describe_prints_a_1d_and_a_3d_network(tmp_path):
    path = _arrays(tmp_path / "s.npz", (40, 3, 150))
    one = run_cli(
        "cnnstudy-describe",
        *_npz(path, *SEQUENCE),
        *SEQUENCE_CONV,
        cwd=tmp_path,
    )
    assert one.returncode == 0, one.stderr
    for text in ("150x3", "73x10", "10x3x7", "21+1 = 22", "floor((150 - 7 + 2*1) / 2) + 1 = 73"):
        assert text in one.stdout, text
    table = json.loads(
        run_cli("cnnstudy-describe", "--json", *_npz(path, *SEQUENCE), cwd=tmp_path).stdout
    )
    assert table["input"] == {"channels": 3, "length": 150}
    assert table["layers"][1]["weight_shape"] == [10, 3, 5]
    volume = _arrays(tmp_path / "v.npz", (8, 1, 16, 28, 28))
    three = run_cli(
        "cnnstudy-describe",
        *_npz(volume, "data.length=null", *VOLUME),
        "model.receptive_field=[3,5,5]",
        "model.padding=[1,0,0]",
        "model.pool_size=[1,2,2]",
        "model.pool_stride=[1,2,2]",
        cwd=tmp_path,
    )
    assert three.returncode == 0, three.stderr
    for text in ("16x28x28x1", "10x1x3x5x5", "3x5x5", "1x0x0", "3x6x6", "16x12x12x10"):
        assert text in three.stdout, text


def test_the_users_arrays_are_checked_with_clear_errors(tmp_path):
    from cnnstudy.data.sources import npz

    def data(path: Path, *overrides: str):
        return resolve(compose(_npz(path, *SEQUENCE, "data.num_classes=4", *overrides))).data

    good = _arrays(tmp_path / "good.npz", (40, 3, 150))
    with pytest.raises(ConfigError, match=r"x_train has shape \[30, 3, 150\]; the config expects"):
        npz(data(good, "data.length=128"))
    with pytest.raises(ConfigError, match="set data.channels=3 data.length=150"):
        npz(data(good, "data.channels=2"))
    missing = tmp_path / "missing.npz"
    np.savez(missing, x=np.zeros((4, 150)), y_train=np.zeros(4, dtype=int))
    with pytest.raises(ConfigError, match="no array x_train"):
        npz(data(missing))
    ragged = tmp_path / "ragged.npz"
    series = np.empty(2, dtype=object)
    series[0], series[1] = np.zeros(150), np.zeros(120)
    np.savez(ragged, x_train=series, y_train=np.array([0, 1]))
    with pytest.raises(ConfigError, match="unequal lengths are not padded by cnnstudy"):
        npz(data(ragged))
    nan = tmp_path / "nan.npz"
    x = np.zeros((4, 3, 150), dtype=np.float32)
    x[2, 1, 7] = np.nan
    np.savez(nan, x_train=x, y_train=np.array([0, 1, 2, 3]))
    with pytest.raises(ConfigError, match=r"x_train\[2\] holds NaN"):
        npz(data(nan))
    labels = tmp_path / "labels.npz"
    np.savez(labels, x_train=np.zeros((4, 3, 150)), y_train=np.array([0.5, 1, 2, 3]))
    with pytest.raises(ConfigError, match="whole-number class labels"):
        npz(data(labels))
    decoded = npz(data(good))
    assert decoded.images.shape == (30, 3, 150) and decoded.test_images.shape == (10, 3, 150)
    one_channel = _arrays(tmp_path / "one.npz", (8, 150))
    assert npz(data(one_channel, "data.channels=1")).images.shape == (6, 1, 150)

    text = tmp_path / "not.npz"
    text.write_text("x,y\n1,2\n")
    done = run_cli("cnnstudy-train", *_npz(text, *SEQUENCE), "trainer=smoke", cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "not a .npz file" in done.stderr and not (tmp_path / "outputs").exists()


@pytest.mark.slow
def test_a_1d_run_on_the_users_arrays_trains_and_reproduces_exactly(tmp_path):
    path = _arrays(tmp_path / "s.npz", (160, 3, 150))
    result, (run,) = train_cli(
        tmp_path, *_npz(path, *SEQUENCE), "trainer=smoke", "trainer.max_epochs=2"
    )
    assert run.info.status == "FINISHED"
    assert run.data.params["data.length"] == "150"
    assert run.data.params["network.stage_outputs"] == '["73x10"]'
    assert run.data.tags["cnnstudy.channels_last"] == "false"
    assert run.data.tags["cnnstudy.cpu_kernels"].startswith("unused: 1D maps")
    assert "test/acc" in run.data.metrics
    again = run_cli(
        "cnnstudy-reproduce",
        run.info.run_id,
        "--no-progress",
        cwd=tmp_path,
        env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"},
    )
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert "MATCH: all" in again.stdout


@pytest.mark.slow
def test_a_3d_run_on_the_users_volumes_trains(tmp_path):
    path = _arrays(tmp_path / "v.npz", (48, 1, 8, 16, 16))
    _, (run,) = train_cli(
        tmp_path,
        *SMOKE,
        *_npz(path, "data.length=null", "data.depth=8", "data.height=16", "data.width=16"),
        "model.receptive_field=[3,5,5]",
        "model.pool_size=[1,2,2]",
        "model.pool_stride=[1,2,2]",
    )
    assert run.info.status == "FINISHED" and "test/acc" in run.data.metrics
    assert run.data.params["network.stage_outputs"] == '["6x6x6x10"]'


@pytest.mark.slow
def test_sequential_mnist_trains_on_real_mnist_read_as_sequences(tmp_path):
    need_real_mnist()
    from cnnstudy.data.splits import load_splits

    rows = load_splits(
        compose(
            [
                "data=sequential_mnist",
                f"data.root={SHARED}",
                "data.length=28",
                "data.channels=28",
                f"data.cache_dir={tmp_path}",
            ]
        ).data
    )
    pixels = load_splits(
        compose(["data=sequential_mnist", f"data.root={SHARED}", f"data.cache_dir={tmp_path}"]).data
    )
    assert pixels.test.images.shape == (10_000, 1, 784) and rows.test.images.shape[1:] == (28, 28)
    # step t of the row reading is the image's row t: the same pixels, two readings
    assert (rows.test.images[0].T.reshape(-1) == pixels.test.images[0, 0]).all()
    assert pixels.test.labels[:2].tolist() == [7, 2]
    _, (run,) = train_cli(
        tmp_path,
        "data=sequential_mnist",
        f"data.root={SHARED}",
        f"data.cache_dir={tmp_path}",
        "trainer=smoke",
    )
    assert run.info.status == "FINISHED"
    assert run.data.params["network.stage_outputs"] == '["390x10"]'


@pytest.mark.slow
def test_moving_mnist_clips_are_real_digits_moving_made_from_a_seed():
    need_real_mnist()
    from cnnstudy.data.sources import moving_mnist

    clips = [
        "data=moving_mnist",
        f"data.root={SHARED}",
        "data.clips=60",
        "data.depth=6",
        "data.height=36",
        "data.width=40",
    ]
    made = moving_mnist(compose(clips).data)
    again = moving_mnist(compose(clips).data)
    other = moving_mnist(compose([*clips, "data.clip_seed=1"]).data)
    assert made.images.shape == (60, 1, 6, 36, 40) and made.test_images.shape == (10, 1, 6, 36, 40)
    assert (made.images == again.images).all() and (made.labels == again.labels).all()
    assert not (made.images == other.images).all()
    frames = made.images[:, 0].flatten(2).sum(2)  # clip x frame: the whole digit every frame
    assert (frames == frames[:, :1]).all() and (frames > 0).all()
    assert (made.images[:, 0, 0] != made.images[:, 0, -1]).flatten(1).any(1).float().mean() > 0.9
    assert set(made.labels.tolist()) <= set(range(10)) and len(set(made.labels.tolist())) > 5
    # two digits a clip: the first is the one-digit clip's (the same draws come first),
    # overlaid by its brighter pixels; the class is the pair, in either order
    two = moving_mnist(resolve(compose([*clips, "data.digits=2"])).data)
    assert resolve(compose([*clips, "data.digits=2"])).data.num_classes == len(two.classes) == 55
    assert (two.images >= made.images).all() and (two.images != made.images).any()
    pairs = [two.classes[i].split("+") for i in two.labels.tolist()]
    assert all(a <= b for a, b in pairs)
    assert all(str(d) in pair for d, pair in zip(made.labels.tolist(), pairs, strict=True))
    said = str(
        pytest.raises(
            ConfigError, check, compose([*clips, "data.digits=2", "data.num_classes=10"])
        ).value
    )
    assert said.startswith("data.num_classes=10: moving MNIST with data.digits=2 has 55")
    # a run on these clips through cnnstudy-train: test_series.py's 3D question, a study


@pytest.mark.slow
def test_series_from_the_ucr_archives_tsv_format(tmp_path):
    """data=csv: one series a row, its label first (GunPoint_TRAIN.tsv's layout); labels
    become classes in numeric order; bad rows are one line naming the file and the row;
    a 1D run trains on it (in this process)."""
    from cnnstudy.data.sources import csv_series
    from cnnstudy.data.splits import load_splits

    rng = np.random.default_rng(0)

    def write(path: Path, n: int) -> Path:
        labels = np.where(np.arange(n) % 2 == 0, 2, 1)  # the UCR files' labels: 1 and 2
        rows = [
            "\t".join([str(label), *(f"{v:.6f}" for v in rng.normal(size=150) + label)])
            for label in labels
        ]
        path.write_text("\n".join(rows) + "\n")
        return path

    train_file, test_file = write(tmp_path / "X_TRAIN.tsv", 50), write(tmp_path / "X_TEST.tsv", 30)
    base = [
        "data=csv",
        f"data.path={train_file}",
        f"data.test_path={test_file}",
        "data.length=150",
        f"data.cache_dir={tmp_path}",
    ]
    cfg = resolve(compose(base))
    assert cfg.data.num_classes == 2
    decoded = csv_series(cfg.data)
    assert decoded.images.shape == (50, 1, 150) and decoded.test_images.shape == (30, 1, 150)
    assert decoded.classes == ["1", "2"] and decoded.labels[:2].tolist() == [1, 0]
    assert len(load_splits(cfg.data).test) == 30  # the test file is the test split
    with pytest.raises(ConfigError, match=r"row 1 holds 150 values after its label, data.len"):
        csv_series(resolve(compose([*base, "data.length=100"])).data)
    broken = tmp_path / "broken.tsv"
    lines = train_file.read_text().splitlines()
    broken.write_text("\n".join([lines[0], lines[1].rsplit("\t", 1)[0] + "\t", *lines[2:]]))
    with pytest.raises(ConfigError, match=r"broken.tsv: row 2 holds '', not a number"):
        csv_series(resolve(compose([*base, f"data.path={broken}"])).data)
    short = tmp_path / "short.tsv"
    short.write_text("\n".join([lines[0], lines[1].rsplit("\t", 3)[0], *lines[2:]]))
    with pytest.raises(ConfigError, match="row 2 holds 147 values .* not padded"):
        csv_series(resolve(compose([*base, f"data.path={short}"])).data)
    with pytest.raises(ConfigError, match="data.channels=3: a CSV row is one series"):
        check(compose([*base, "data.channels=3"]))

    _, (run,) = train_cli(tmp_path, *SMOKE, *base)
    assert run.info.status == "FINISHED" and "test/acc" in run.data.metrics
