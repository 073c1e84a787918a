"""Shape arithmetic: the layer-by-layer plan of a network, computed before any tensor exists.

`plan(model_cfg, data_cfg)` walks the layers the config describes and returns one
`Layer` per row of the describe table: shapes, the output-size formula with its
numbers, weight tensor shape, parameters and connections. The torch model is
built from the same plan, so the arithmetic shown is the network trained.

Output size of a conv or pool layer: floor((W - F + 2P) / S) + 1.
Shapes are (channels, height, width) for feature maps and (units,) for flat layers.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from cnnstudy.errors import ConfigError


@dataclass(frozen=True)
class Layer:
    name: str  # conv1_1, pool1, flatten, fc1, output, dropout...
    kind: str  # input, conv, pool, dropout, flatten, fc, output
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    receptive_field: int | None = None  # F, the filter or pool window side
    stride: int | None = None
    padding: int | str | None = None
    formula: str = ""  # output size, numbers filled in
    weight_shape: tuple[int, ...] | None = None  # torch layout: out x in x F x F, or out x in
    weights_per_neuron: int | None = None  # weights + 1 bias, per filter or per unit
    params: int = 0
    connections: int = 0  # weighted edges incl. bias; for pooling, window inputs per output
    input_field: int | None = None  # side of the input-image patch one output value sees
    activation: str | None = None
    dropout: float | None = None

    @property
    def outputs(self) -> int:
        n = 1
        for d in self.out_shape:
            n *= d
        return n

    def to_dict(self) -> dict[str, Any]:
        row = asdict(self)
        row["in_shape"] = list(self.in_shape)
        row["out_shape"] = list(self.out_shape)
        row["weight_shape"] = list(self.weight_shape) if self.weight_shape else None
        row["outputs"] = self.outputs
        return row


def grown(first: int, growth: float, n: int) -> list[int]:
    """`first`, then x `growth` per step, n counts: each rounded to the nearest whole number,
    halves up (10 with growth 0.5 over three stages: 10, 5, 3; Python's round() would give
    10, 5, 2), and at least 1. A millionth of slack absorbs float error (120 x 0.7 = 83.99...)."""
    return [max(1, math.floor(first * growth**i + 0.5 + 1e-6)) for i in range(n)]


def stage_filters(model: Any) -> list[int]:
    """Filters per conv stage: the explicit list, or `filters` grown by `filter_growth`."""
    if model.filters_per_stage is not None:
        return [int(n) for n in model.filters_per_stage]
    return grown(model.filters, model.filter_growth, model.stages)


def hidden_sizes(model: Any) -> list[int]:
    """Units per hidden layer: the explicit list, or `hidden_units` grown by `hidden_growth`."""
    if model.hidden_units_per_layer is not None:
        return [int(n) for n in model.hidden_units_per_layer]
    return grown(model.hidden_units, model.hidden_growth, model.hidden_layers)


def _side(size: int, field: int, pad: int, stride: int) -> tuple[int, str]:
    out = (size - field + 2 * pad) // stride + 1
    return out, f"floor(({size} - {field} + 2*{pad}) / {stride}) + 1 = {out}"


def _sliding(
    name: str,
    where: str,
    shape: tuple[int, int, int],
    field: int,
    pad: int,
    stride: int,
    key: str,
    value: Any,
) -> tuple[int, int, str]:
    """Output height and width of a sliding window; a ConfigError when either is below 1."""
    _, h, w = shape
    out_h, f_h = _side(h, field, pad, stride)
    out_w, f_w = _side(w, field, pad, stride)
    formula = f_h if h == w else f"H: {f_h}; W: {f_w}"
    if out_h < 1 or out_w < 1:
        c = shape[0]
        raise ConfigError(
            f"{key}={value}: {name} ({where}) gets a {h}x{w}x{c} input and its output size "
            f"would be {formula}, below 1. Valid: a window of at most {min(h, w) + 2 * pad} "
            "here, more padding (model.padding), a smaller stride, or fewer stages (model.stages)."
        )
    return out_h, out_w, formula


def plan(model: Any, data: Any) -> list[Layer]:
    """The layers of the network `model` describes, for inputs of `data`'s shape."""
    shape: tuple[int, ...] = (data.channels, data.height, data.width)
    field, jump = 1, 1  # receptive field on the input image, and its step, of the current map
    layers = [Layer("input", "input", shape, shape, input_field=1)]
    act = model.activation
    for s, filters in enumerate(stage_filters(model), start=1):
        for k in range(1, model.convs_per_stage + 1):
            c, h, w = shape
            name = f"conv{s}_{k}" if model.convs_per_stage > 1 else f"conv{s}"
            f, stride = model.receptive_field, model.stride
            if model.padding == "same":
                out_h, out_w = h, w
                pad: int | str = "same"
                formula = f"same: P = ({f} - 1)/2 = {(f - 1) / 2:g}, output = input = {h}"
                if h != w:
                    formula = f"same: output = input = {h}x{w}"
            else:
                pad = int(model.padding)
                out_h, out_w, formula = _sliding(
                    name, f"stage {s}, conv {k}", shape, f, pad, stride, "model.receptive_field", f
                )
            per = f * f * c + 1
            out = (filters, out_h, out_w)
            field, jump = field + (f - 1) * jump, jump * stride
            layers.append(
                Layer(
                    name,
                    "conv",
                    shape,
                    out,
                    f,
                    stride,
                    pad,
                    formula,
                    (filters, c, f, f),
                    per,
                    per * filters,
                    per * filters * out_h * out_w,
                    field,
                    act,
                )
            )
            shape = out
        if model.pool != "none":
            c, h, w = shape
            p, ps = model.pool_size, model.pool_stride
            out_h, out_w, formula = _sliding(
                f"pool{s}",
                f"{model.pool} pool after stage {s}",
                shape,
                p,
                0,
                ps,
                "model.pool_size",
                p,
            )
            out = (c, out_h, out_w)
            field, jump = field + (p - 1) * jump, jump * ps
            layers.append(
                Layer(
                    f"pool{s}",
                    "pool",
                    shape,
                    out,
                    p,
                    ps,
                    0,
                    formula,
                    connections=p * p * c * out_h * out_w,
                    input_field=field,
                    activation=model.pool,
                )
            )
            shape = out
        if model.pool_dropout > 0:
            layers.append(Layer(f"dropout{s}", "dropout", shape, shape, dropout=model.pool_dropout))

    if len(shape) == 3:
        flat = (shape[0] * shape[1] * shape[2],)
        c, h, w = shape
        layers.append(Layer("flatten", "flatten", shape, flat, formula=f"{h}*{w}*{c} = {flat[0]}"))
        shape = flat
    sizes = hidden_sizes(model)
    for i, units in enumerate(sizes + [data.num_classes], start=1):
        last = i == len(sizes) + 1
        n_in = shape[0]
        per = n_in + 1
        layers.append(
            Layer(
                "output" if last else f"fc{i}",
                "output" if last else "fc",
                shape,
                (units,),
                weight_shape=(units, n_in),
                weights_per_neuron=per,
                params=per * units,
                connections=per * units,
                activation="softmax" if last else act,
            )
        )
        shape = (units,)
        if not last and model.hidden_dropout > 0:
            layers.append(
                Layer(f"dropout_fc{i}", "dropout", shape, shape, dropout=model.hidden_dropout)
            )
    return layers


def totals(layers: list[Layer]) -> dict[str, int]:
    return {
        "params": sum(layer.params for layer in layers),
        "connections": sum(layer.connections for layer in layers),
    }


def stage_outputs(layers: list[Layer]) -> list[tuple[int, ...]]:
    """The feature-map shape each conv stage hands on (after its pool, if any)."""
    outputs: dict[str, tuple[int, ...]] = {}
    for layer in layers:
        if layer.kind in ("conv", "pool"):
            stage = layer.name.removeprefix("conv").removeprefix("pool").split("_")[0]
            outputs[stage] = layer.out_shape
    return list(outputs.values())


def architecture(layers: list[Layer]) -> dict[str, str]:
    """The network that trains, resolved from the config, as MLflow params
    (`network.*`): the dashboard's columns describe it, not only the keys that made it."""
    import json

    def shape(s: tuple[int, ...]) -> str:
        return f"{s[1]}x{s[2]}x{s[0]}" if len(s) == 3 else str(s[0])

    convs = [layer for layer in layers if layer.kind == "conv"]
    stages = stage_outputs(layers)
    hidden = [layer.out_shape[0] for layer in layers if layer.kind == "fc"]
    flat = next((layer.out_shape[0] for layer in layers if layer.kind == "flatten"), None)
    return {
        "network.conv_layers": str(len(convs)),
        "network.filters_per_stage": json.dumps([s[0] for s in stages]),
        "network.stage_outputs": json.dumps([shape(s) for s in stages]),
        "network.flat_features": str(flat if flat is not None else layers[0].outputs),
        "network.hidden_units_per_layer": json.dumps(hidden),
        "network.params": str(totals(layers)["params"]),
        "network.connections": str(totals(layers)["connections"]),
    }
