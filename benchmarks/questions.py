"""What each study of the question library (sweeps/) costs on the digits, as a user runs
it: `cnnstudy-train -m sweep=NAME` with the file's own budget, its report included.

    .venv/bin/python benchmarks/questions.py                    # every file in sweeps/
    .venv/bin/python benchmarks/questions.py pooling dropout    # some of them

Baseline, in the same run: one `cnnstudy-train` of the seed network with the same
epochs (a whole process: imports, data, training, MLflow). Prints per study its wall
time, its training runs (trials x seeds, rejected architectures not counted), seconds a
run, and the ratio of its wall time to the baseline's (how many single commands the
study costs). Each study writes to a fresh scratch folder. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]


def command(where: Path, args: list[str]) -> float:
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{where}/mlflow.db", "PATH": str(BIN)}
    started = time.perf_counter()
    done = subprocess.run(
        [str(BIN / "cnnstudy-train"), *args, f"logger.artifact_location={where}/a"],
        cwd=where,
        env=env,
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"cnnstudy-train {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return seconds


def study(name: str, scratch: Path) -> tuple[float, int, dict]:
    where = scratch / name
    where.mkdir()
    storage = f"hydra.sweeper.storage=sqlite:///{where}/optuna.db"
    seconds = command(where, ["-m", f"sweep={name}", storage])
    (results,) = where.glob("multirun/*/*/results.yaml")
    summary = yaml.safe_load(results.read_text())
    sweep = yaml.safe_load((REPO / "sweeps" / f"{name}.yaml").read_text())
    return seconds, int(sweep["hydra"]["sweeper"].get("seeds", 1)), summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="studies in sweeps/ (default: all)")
    args = parser.parse_args()
    names = args.names or sorted(p.stem for p in (REPO / "sweeps").glob("*.yaml"))
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        (scratch / "baseline").mkdir()
        base = command(scratch / "baseline", ["logger.log_model=false", "logger.log_images=false"])
        print(f"baseline: one cnnstudy-train of the seed network (3 epochs): {base:.1f} s")
        print(f"{'study':16} {'wall s':>8} {'runs':>5} {'s/run':>6} {'x baseline':>10}")
        for name in names:
            seconds, seeds, summary = study(name, scratch)
            runs = int(summary["finished"]) * seeds
            per = seconds / runs if runs else float("nan")
            print(f"{name:16} {seconds:8.1f} {runs:5d} {per:6.2f} {seconds / base:10.1f}x")


if __name__ == "__main__":
    main()
