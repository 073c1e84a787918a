"""cnnstudy-describe: the composed config as shape arithmetic, one row per layer.

    cnnstudy-describe                      # the default network (seed_example) on the default data
    cnnstudy-describe model=lenet5 model.receptive_field=3
    cnnstudy-describe --json model=mlp     # the same table, machine-readable

Takes the same overrides as cnnstudy-train; imports neither torch nor Lightning.
"""

from __future__ import annotations

import argparse
import json
import sys

from cnnstudy.config.check import check, series_from_files
from cnnstudy.config.compose import compose
from cnnstudy.errors import console_script, user_errors_exit
from cnnstudy.network.table import describe, render


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
    if cfg.data.name == "ucr":  # the series' length and channels, read from the files
        cfg = series_from_files(cfg)
    table = describe(cfg, layers)
    if args.json:
        json.dump(table, sys.stdout, indent=2)
        print()
    else:
        print(render(table, layers), end="")


cli = console_script(main)

if __name__ == "__main__":
    main()
