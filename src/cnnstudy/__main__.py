"""`python -m cnnstudy COMMAND ...`: the console scripts, by name.

python -m cnnstudy train model=lenet5        # = cnnstudy-train model=lenet5
python -m cnnstudy describe | report | reproduce | ui
"""

from __future__ import annotations

import sys

COMMANDS = {
    "train": "cnnstudy.run.train",
    "describe": "cnnstudy.describe",
    "report": "cnnstudy.study.report",
    "reproduce": "cnnstudy.run.reproduce",
    "ui": "cnnstudy.run.dashboard",
    "services": "cnnstudy.services",  # make services: PostgreSQL and an MLflow server
}


def main() -> None:
    import importlib

    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        given = sys.argv[1] if len(sys.argv) > 1 else "nothing"
        print(
            f"usage: python -m cnnstudy COMMAND [ARGS]; got {given}. Commands: "
            f"{', '.join(COMMANDS)} (the same as cnnstudy-COMMAND)",
            file=sys.stderr,
        )
        sys.exit(2 if len(sys.argv) > 1 else 0)
    command = sys.argv[1]
    sys.argv = [f"cnnstudy-{command}", *sys.argv[2:]]
    importlib.import_module(COMMANDS[command]).cli()


if __name__ == "__main__":
    main()
