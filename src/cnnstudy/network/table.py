"""The describe table: the shape plan as rows a person reads (printed by cnnstudy-describe,
logged to every run as describe.txt and describe.json). Imports neither torch nor Lightning.
"""

from __future__ import annotations

import io
from typing import Any

from cnnstudy.network.plan import AXES, Layer, axis_text, dims_of, input_size, shape_text, totals

__all__ = ["describe", "render", "shape_text"]

AXIS_KEYS = {"L": "length", "D": "depth", "H": "height", "W": "width"}


def describe(cfg: Any, layers: list[Layer]) -> dict[str, Any]:
    """The describe table of a checked config and its shape plan, as plain data."""
    return {
        "model": cfg.model.name,
        "input": {
            "channels": cfg.data.channels,
            **{
                AXIS_KEYS[axis]: n
                for axis, n in zip(AXES[dims_of(cfg.data)], input_size(cfg.data), strict=True)
            },
        },
        "layers": [layer.to_dict() for layer in layers],
        **totals(layers),
    }


def _weights(layer: Layer) -> str:
    if layer.weights_per_neuron is None:
        return ""
    return f"{layer.weights_per_neuron - 1:,}+1 = {layer.weights_per_neuron:,}"


def render(table: dict[str, Any], layers: list[Layer]) -> str:
    """The table as text, as printed by the command and logged to MLflow as describe.txt."""
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{table['model']}: shape arithmetic", show_lines=False)
    for col in (
        "layer",
        "input",
        "output",
        "F",
        "S",
        "P",
        "output size",
        "weights",
        "per neuron",
        "params",
        "connections",
        "sees",
    ):
        t.add_column(col, justify="right" if col in ("params", "connections") else "left")
    for layer in layers:
        extra = ""
        if layer.kind == "dropout":
            extra = f"p={layer.dropout:g}"
        elif layer.activation:
            extra = layer.activation
        t.add_row(
            f"{layer.name} {extra}".strip(),
            shape_text(layer.in_shape),
            shape_text(layer.out_shape),
            "" if layer.receptive_field is None else axis_text(layer.receptive_field),
            "" if layer.stride is None else axis_text(layer.stride),
            "" if layer.padding is None else axis_text(layer.padding),
            layer.formula,
            "x".join(map(str, layer.weight_shape)) if layer.weight_shape else "",
            _weights(layer),
            f"{layer.params:,}" if layer.params else "",
            f"{layer.connections:,}" if layer.connections else "",
            "" if layer.input_field is None else axis_text(layer.input_field, layer.dims),
        )
    t.add_section()
    t.add_row(
        "total", "", "", "", "", "", "", "", "", f"{table['params']:,}", f"{table['connections']:,}"
    )
    console = Console(width=200, file=io.StringIO())
    console.print(t)
    return console.file.getvalue()
