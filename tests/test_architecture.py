"""Shape arithmetic: the reference numbers, exactly, and the torch network built from the plan."""

from __future__ import annotations

import json

import pytest

from cnnstudy.config.compose import compose
from cnnstudy.network.plan import plan, totals

from .conftest import run_cli


def layers_of(*overrides: str):
    cfg = compose(list(overrides))
    return {layer.name: layer for layer in plan(cfg.model, cfg.data)}, cfg


def test_seed_example_reference_numbers():
    layers, _ = layers_of()
    conv, pool, fc, out = layers["conv1"], layers["pool1"], layers["fc1"], layers["output"]
    assert layers["input"].outputs == 1024
    assert conv.weights_per_neuron == 26
    assert conv.out_shape == (10, 28, 28)
    assert conv.outputs == 7840
    assert conv.connections == 203_840
    assert conv.weight_shape == (10, 1, 5, 5)
    assert conv.formula == "floor((32 - 5 + 2*0) / 1) + 1 = 28"
    assert pool.out_shape == (10, 14, 14) and pool.outputs == 1960
    assert fc.weights_per_neuron == 1961 and fc.params == 392_200
    assert out.params == 2010
    assert totals(list(layers.values()))["params"] == 394_470


@pytest.mark.parametrize(
    ("model", "params"), [("seed_example", 394_470), ("lenet5", 61_706), ("mlp", 310_510)]
)
def test_named_architectures(model, params):
    layers, _ = layers_of(f"model={model}")
    assert totals(list(layers.values()))["params"] == params


def test_weight_tensor_shows_how_channels_change():
    layers, _ = layers_of(
        "model.stages=2",
        "model.filters_per_stage=[16,8]",
        "model.filters=null",
        "model.filter_growth=null",
        "model.receptive_field=3",
    )
    assert layers["conv2"].weight_shape == (8, 16, 3, 3)
    assert layers["conv2"].weights_per_neuron == 16 * 9 + 1


def test_padding_same_keeps_size_and_growth_multiplies_filters():
    layers, _ = layers_of(
        "model.stages=3",
        "model.filters=8",
        "model.filter_growth=2",
        "model.padding=same",
        "model.receptive_field=3",
        "model.convs_per_stage=2",
    )
    assert layers["conv1_1"].out_shape == (8, 32, 32)
    assert layers["conv2_2"].out_shape == (16, 16, 16)
    assert layers["conv3_1"].out_shape == (32, 8, 8)
    assert layers["pool3"].out_shape == (32, 4, 4)


@pytest.mark.parametrize(
    ("override", "filters", "hidden"),
    [
        ("model.filters=32", [32, 85], [120, 84]),
        ("model.filter_growth=2", [6, 12], [120, 84]),
        ("model.hidden_units=500", [6, 16], [500, 350]),
        ("model.hidden_growth=1", [6, 16], [120, 120]),
    ],
)
def test_every_scalar_key_of_lenet5_changes_its_network(override, filters, hidden):
    """A sweep over any sizing key of a shipped model measures a different network."""
    from cnnstudy.config.check import check
    from cnnstudy.network.plan import hidden_sizes, stage_filters

    cfg = compose(["model=lenet5", override])
    layers = check(cfg)
    assert (stage_filters(cfg.model), hidden_sizes(cfg.model)) == (filters, hidden)
    assert totals(layers)["params"] != 61_706


@pytest.mark.parametrize("model", ["seed_example", "lenet5", "mlp"])
def test_shipped_models_are_sized_by_their_scalar_keys_only(model):
    cfg = compose([f"model={model}"])
    assert cfg.model.filters_per_stage is None and cfg.model.hidden_units_per_layer is None


def test_grown_counts_round_halves_up():
    from cnnstudy.network.plan import grown

    assert grown(10, 0.5, 3) == [10, 5, 3]  # 2.5 -> 3, where round() gives 2
    assert grown(10, 0.25, 3) == [10, 3, 1]  # 2.5 -> 3, 0.625 -> 1
    assert grown(6, 2.6667, 2) == [6, 16]
    assert grown(120, 0.7, 2) == [120, 84]  # 83.99999... in floats
    assert grown(3, 0.1, 3) == [3, 1, 1]  # never below 1
    assert grown(7, 1.5, 3) == [7, 11, 16]  # 10.5 -> 11, 15.75 -> 16


def test_the_resolved_architecture_is_logged_as_params():
    from cnnstudy.network.plan import architecture

    cfg = compose(["model=lenet5"])
    arch = architecture(plan(cfg.model, cfg.data))
    assert arch == {
        "network.conv_layers": "2",
        "network.filters_per_stage": "[6, 16]",
        "network.stage_outputs": '["14x14x6", "5x5x16"]',
        "network.flat_features": "400",
        "network.hidden_units_per_layer": "[120, 84]",
        "network.params": "61706",
        "network.connections": str(totals(plan(cfg.model, cfg.data))["connections"]),
    }


def test_check_does_not_change_the_config(tmp_path):
    from cnnstudy.config.check import check

    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "x.png").write_bytes(b"")
    cfg = compose(["data=folder", f"data.path={tmp_path}"])
    before = cfg.copy()
    layers = check(cfg)
    assert cfg == before and cfg.data.num_classes == 0
    assert layers[-1].out_shape == (3,)  # one output per class folder


def test_receptive_field_on_the_input_grows_with_depth():
    layers, _ = layers_of("model=lenet5")
    assert [layers[n].input_field for n in ("conv1", "pool1", "conv2", "pool2")] == [5, 6, 14, 16]


def test_built_network_matches_the_plan_layer_by_layer():
    import torch

    from cnnstudy.network.modules import build_network

    overrides = (
        "model.stages=2",
        "model.convs_per_stage=2",
        "model.filters=6",
        "model.filter_growth=2",
        "model.receptive_field=3",
        "model.stride=1",
        "model.padding=1",
        "model.activation=tanh",
        "model.pool=avg",
        "model.pool_dropout=0.25",
        "model.hidden_layers=2",
        "model.hidden_units=64",
        "model.hidden_dropout=0.5",
        "data.channels=3",
        "data.height=28",
        "data.width=36",
    )
    cfg = compose(list(overrides))
    layers = plan(cfg.model, cfg.data)
    net = build_network(layers)
    assert sum(p.numel() for p in net.parameters()) == totals(layers)["params"]
    shapes = {}
    for name, module in net.named_children():
        module.register_forward_hook(
            lambda m, i, o, name=name: shapes.__setitem__(name, o.shape[1:])
        )
    net(torch.zeros(2, 3, 28, 36))
    for layer in layers[1:]:
        assert tuple(shapes[layer.name]) == layer.out_shape, layer.name
    kinds = [type(m).__name__ for m in net]
    assert kinds.count("Tanh") == 4 + 2 and kinds.count("AvgPool2d") == 2
    assert kinds.count("Dropout") == 2 + 2


def test_describe_json_is_the_same_table(tmp_path):
    result = run_cli("cnnstudy-describe", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    table = json.loads(result.stdout)
    assert table["params"] == 394_470
    conv = next(row for row in table["layers"] if row["name"] == "conv1")
    assert conv["out_shape"] == [10, 28, 28]
    assert conv["connections"] == 203_840
    assert conv["weights_per_neuron"] == 26


def test_describe_table_prints_the_arithmetic(tmp_path):
    result = run_cli("cnnstudy-describe", "model=lenet5", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for text in (
        "floor((32 - 5 + 2*0) / 1) + 1 = 28",
        "16x6x5x5",
        "150+1 = 151",
        "61,706",
        "14x14x6",
        "5x5x16",
    ):
        assert text in result.stdout
