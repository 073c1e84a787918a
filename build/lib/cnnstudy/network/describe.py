"""cnnstudy-describe: the composed config as shape arithmetic, one row per layer.

    cnnstudy-describe                      # the default network (seed_example) on the default data
    cnnstudy-describe model=lenet5 model.receptive_field=3
    cnnstudy-describe --json model=mlp     # the same table, machine-readable

Takes the same overrides as cnnstudy-train; imports neither torch nor Lightning.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from typing import Any

from cnnstudy.config.check import check
from cnnstudy.config.compose import compose
from cnnstudy.errors import console_script, user_errors_exit
from cnnstudy.network.plan import Layer, totals


def shape_text(shape: tuple[int, ...]) -> str:
    if len(shape) == 3:
        c, h, w = shape
        return f"{h}x{w}x{c}"
    return f"{shape[0]:,}"


def describe(cfg: Any, layers: list[Layer]) -> dict[str, Any]:
    """The describe table of a checked config and its shape plan, as plain data."""
    return {
        "model": cfg.model.name,
        "input": {
            "channels": cfg.data.channels,
            "height": cfg.data.height,
            "width": cfg.data.width,
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
            "" if layer.receptive_field is None else str(layer.receptive_field),
            "" if layer.stride is None else str(layer.stride),
            "" if layer.padding is None else str(layer.padding),
            layer.formula,
            "x".join(map(str, layer.weight_shape)) if layer.weight_shape else "",
            _weights(layer),
            f"{layer.params:,}" if layer.params else "",
            f"{layer.connections:,}" if layer.connections else "",
            "" if layer.input_field is None else f"{layer.input_field}x{layer.input_field}",
        )
    t.add_section()
    t.add_row(
        "total", "", "", "", "", "", "", "", "", f"{table['params']:,}", f"{table['connections']:,}"
    )
    console = Console(width=200, file=io.StringIO())
    console.print(t)
    return console.file.getvalue()


@user_errors_exit
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="cnnstudy-describe",
        description="Print the per-layer shape arithmetic of the composed config.",
        epilog="Overrides are Hydra's, as for cnnstudy-train: model=lenet5 model.stride=2 ...",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument(
        "--config-dir",
        "-cd",
        default=None,
        help="a folder of your own configs, searched as cnnstudy-train --config-dir does "
        "(my_conf/model/my_net.yaml: model=my_net)",
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides (default: none)")
    args = parser.parse_args(argv)
    cfg = compose(args.overrides, args.config_dir)
    layers = check(cfg)
    table = describe(cfg, layers)
    if args.json:
        json.dump(table, sys.stdout, indent=2)
        print()
    else:
        print(render(table, layers), end="")


cli = console_script(main)

if __name__ == "__main__":
    main()
