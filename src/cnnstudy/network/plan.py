"""Shape arithmetic: the layer-by-layer plan of a network, computed before any tensor exists.

`plan(model_cfg, data_cfg)` walks the layers the config describes and returns one
`Layer` per row of the describe table: shapes, the output-size formula with its
numbers, weight tensor shape, parameters and connections. The torch model is
built from the same plan, so the arithmetic shown is the network trained.

Output size of a conv or pool layer, on each axis: floor((W - F + 2P) / S) + 1.
Shapes are (channels, *axes) for feature maps, the axes (length), (height, width) or
(depth, height, width) as the data has them, and (units,) for flat layers. F, S and P
are one number for every axis or one per axis.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from cnnstudy.errors import ConfigError

AXES = {1: ("L",), 2: ("H", "W"), 3: ("D", "H", "W")}  # length; height, width; depth


def dims_of(data: Any) -> int:
    """The input's spatial axes, from the data: 1 for sequences (`data.length`), 3 for
    volumes and clips (`data.depth`, with height and width), 2 for images."""
    if data.get("length") is not None:
        return 1
    return 3 if data.get("depth") is not None else 2


def input_size(data: Any) -> tuple[int, ...]:
    """(length,), (height, width) or (depth, height, width)."""
    dims = dims_of(data)
    if dims == 1:
        return (int(data.length),)
    size = (int(data.height), int(data.width))
    return (int(data.depth), *size) if dims == 3 else size


def per_axis(value: Any, dims: int) -> tuple[int, ...]:
    """A model key's value on each axis: one number for all, or a list of one per axis."""
    if isinstance(value, int):
        return (value,) * dims
    return tuple(int(v) for v in value)


def compact(values: tuple[int, ...]) -> int | tuple[int, ...]:
    """One number where every axis has it, else the tuple."""
    return values[0] if len(set(values)) == 1 else values


def axis_text(value: Any, dims: int = 1) -> str:
    """3, or 3x5x5 for a value per axis; an int repeated over `dims` axes when dims > 1
    and asked for (the patch an output sees)."""
    if isinstance(value, (tuple, list)):
        return "x".join(str(v) for v in value)
    return "x".join([str(value)] * dims)


def shape_text(shape: tuple[int, ...]) -> str:
    """Feature maps as their axes then channels (32x32x1, 784x1, 16x28x28x1); flat
    layers as their count."""
    if len(shape) >= 2:
        return "x".join(str(n) for n in (*shape[1:], shape[0]))
    return f"{shape[0]:,}"


@dataclass(frozen=True)
class Layer:
    name: str  # conv1_1, pool1, flatten, fc1, output, dropout...
    kind: str  # input, conv, pool, dropout, flatten, fc, output
    in_shape: tuple[int, ...]  # (channels, *axes) for feature maps, (units,) for flat layers
    out_shape: tuple[int, ...]
    receptive_field: int | tuple[int, ...] | None = None  # F: one number, or one per axis
    stride: int | tuple[int, ...] | None = None
    padding: int | tuple[int, ...] | str | None = None
    formula: str = ""  # output size, numbers filled in
    weight_shape: tuple[int, ...] | None = None  # torch layout: out x in x F..., or out x in
    weights_per_neuron: int | None = None  # weights + 1 bias, per filter or per unit
    params: int = 0
    connections: int = 0  # weighted edges incl. bias; for pooling, window inputs per output
    input_field: int | tuple[int, ...] | None = None  # the input patch one output sees, per axis
    activation: str | None = None
    dropout: float | None = None

    @property
    def outputs(self) -> int:
        return math.prod(self.out_shape)

    @property
    def dims(self) -> int:
        """Spatial axes of the layer's input (0 for flat layers)."""
        return len(self.in_shape) - 1

    def to_dict(self) -> dict[str, Any]:
        row = asdict(self)
        for key, value in row.items():
            if isinstance(value, tuple):
                row[key] = list(value)
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
    shape: tuple[int, ...],
    field: tuple[int, ...],
    pad: tuple[int, ...],
    stride: tuple[int, ...],
    key: str,
    value: Any,
) -> tuple[tuple[int, ...], str]:
    """Output size on each axis of a sliding window; a ConfigError naming the axis and its
    formula when any is below 1."""
    size = shape[1:]
    names = AXES[len(size)]
    sides = [_side(n, f, p, s) for n, f, p, s in zip(size, field, pad, stride, strict=True)]
    same = len(set(zip(size, field, pad, stride, strict=True))) == 1
    formula = (
        sides[0][1]
        if same
        else "; ".join(f"{a}: {t}" for a, (_, t) in zip(names, sides, strict=True))
    )
    bad = [i for i, (out, _) in enumerate(sides) if out < 1]
    if bad:
        on = "" if len(bad) == len(size) else " on axis " + ", ".join(names[i] for i in bad)
        widest = min(size[i] + 2 * pad[i] for i in bad)
        raise ConfigError(
            f"{key}={_show(value)}: {name} ({where}) gets a {shape_text(shape)} input and its "
            f"output size would be {formula}, below 1{on}. Valid: a window of at most {widest}"
            f"{on} here, more padding (model.padding), a smaller stride, or fewer stages "
            "(model.stages)."
        )
    return tuple(out for out, _ in sides), formula


def _show(value: Any) -> str:
    return str(list(value)) if isinstance(value, (tuple, list)) else str(value)


def plan(model: Any, data: Any) -> list[Layer]:
    """The layers of the network `model` describes, for inputs of `data`'s shape: 1D
    (sequences), 2D (images) or 3D (volumes, clips), as the data has them."""
    size = input_size(data)
    dims = len(size)
    shape: tuple[int, ...] = (data.channels, *size)
    # receptive field on the input, and its step, of the current map: per axis
    field, jump = (1,) * dims, (1,) * dims
    layers = [Layer("input", "input", shape, shape, input_field=1)]
    act = model.activation
    f = per_axis(model.receptive_field, dims)
    stride = per_axis(model.stride, dims)
    for s, filters in enumerate(stage_filters(model), start=1):
        for k in range(1, model.convs_per_stage + 1):
            c, here = shape[0], shape[1:]
            name = f"conv{s}_{k}" if model.convs_per_stage > 1 else f"conv{s}"
            if model.padding == "same":
                out_size = here
                pad: int | tuple[int, ...] | str = "same"
                if len(set(here)) == 1 and len(set(f)) == 1:
                    formula = (
                        f"same: P = ({f[0]} - 1)/2 = {(f[0] - 1) / 2:g}, output = input = {here[0]}"
                    )
                else:
                    formula = f"same: output = input = {axis_text(here)}"
            else:
                pads = per_axis(model.padding, dims)
                pad = compact(pads)
                out_size, formula = _sliding(
                    name,
                    f"stage {s}, conv {k}",
                    shape,
                    f,
                    pads,
                    stride,
                    "model.receptive_field",
                    model.receptive_field,
                )
            per = math.prod(f) * c + 1
            out = (filters, *out_size)
            field = tuple(a + (b - 1) * j for a, b, j in zip(field, f, jump, strict=True))
            jump = tuple(j * st for j, st in zip(jump, stride, strict=True))
            layers.append(
                Layer(
                    name,
                    "conv",
                    shape,
                    out,
                    compact(f),
                    compact(stride),
                    pad,
                    formula,
                    (filters, c, *f),
                    per,
                    per * filters,
                    per * filters * math.prod(out_size),
                    compact(field),
                    act,
                )
            )
            shape = out
        if model.pool != "none":
            c = shape[0]
            p, ps = per_axis(model.pool_size, dims), per_axis(model.pool_stride, dims)
            out_size, formula = _sliding(
                f"pool{s}",
                f"{model.pool} pool after stage {s}",
                shape,
                p,
                (0,) * dims,
                ps,
                "model.pool_size",
                model.pool_size,
            )
            out = (c, *out_size)
            field = tuple(a + (b - 1) * j for a, b, j in zip(field, p, jump, strict=True))
            jump = tuple(j * st for j, st in zip(jump, ps, strict=True))
            layers.append(
                Layer(
                    f"pool{s}",
                    "pool",
                    shape,
                    out,
                    compact(p),
                    compact(ps),
                    0,
                    formula,
                    connections=math.prod(p) * c * math.prod(out_size),
                    input_field=compact(field),
                    activation=model.pool,
                )
            )
            shape = out
        if model.pool_dropout > 0:
            layers.append(Layer(f"dropout{s}", "dropout", shape, shape, dropout=model.pool_dropout))

    if len(shape) >= 2:
        flat = (math.prod(shape),)
        formula = "*".join(str(n) for n in (*shape[1:], shape[0])) + f" = {flat[0]}"
        layers.append(Layer("flatten", "flatten", shape, flat, formula=formula))
        shape = flat
    sizes = hidden_sizes(model)
    regression = data.get("task") == "regression"
    outputs = 1 if regression else data.num_classes  # a regression predicts one number
    for i, units in enumerate(sizes + [outputs], start=1):
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
                activation=("linear" if regression else "softmax") if last else act,
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
        return shape_text(s) if len(s) >= 2 else str(s[0])

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
