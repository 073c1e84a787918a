"""Configs that cannot work stop before any tensor exists: one message, exit 2, no traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from .conftest import run_cli

CASES = [
    # (overrides, words the message must hold)
    (
        ["model.receptive_field=40"],
        ["model.receptive_field=40", "conv1", "floor((32 - 40 + 2*0) / 1) + 1 = -7"],
    ),
    (["model.stride=0"], ["model.stride=0", "at least 1"]),
    (["model.stages=6"], ["model.pool_size=2", "pool3", "1x1x10", "= 0, below 1"]),
    (["model.pool_dropout=-0.1"], ["model.pool_dropout=-0.1", "[0, 1)"]),
    (["model.hidden_dropout=1.5"], ["model.hidden_dropout=1.5", "[0, 1)"]),
    (["model.pool=median"], ["model.pool=median", "max, avg, none"]),
    (["model.activation=gelu"], ["model.activation=gelu", "relu, tanh, sigmoid, none"]),
    (["model.padding=-1"], ["model.padding=-1", "'same'"]),
    (["model.padding=same", "model.stride=2"], ["model.padding=same", "stride=1"]),
    (["+model.fitlers=8"], ["model.fitlers=8", "unknown key", "did you mean model.filters"]),
    (["optimizer.lr=0"], ["optimizer.lr=0", "positive"]),
    (["data.val_fraction=0.5", "data.test_fraction=0.5"], ["data.val_fraction=0.5", "no training"]),
    (["trainer.max_epochs=0"], ["trainer.max_epochs=0", "at least 1"]),
]


@pytest.mark.parametrize(("overrides", "words"), CASES, ids=[" ".join(c[0]) for c in CASES])
@pytest.mark.parametrize("command", ["cnnstudy-train", "cnnstudy-describe"])
def test_invalid_config_is_one_clear_message(tmp_path, command, overrides, words):
    result = run_cli(command, *overrides, cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr + result.stdout
    message = result.stderr.strip()
    assert message.startswith("cnnstudy: error: ") and message.count("\n") == 0
    for word in words:
        assert word in message
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ("model.fitlers=8", ["model.fitlers", "not in 'ModelConfig'"]),
        ("model.stride=two", ["model.stride", "'two'", "Integer"]),
        ("model=resnet", ["model/resnet", "lenet5", "mlp", "seed_example"]),
    ],
)
def test_hydra_rejects_unknown_keys_types_and_files(tmp_path, override, words):
    result = run_cli("cnnstudy-train", override, cwd=tmp_path)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in result.stderr


def test_a_typo_in_a_config_file_names_the_key(tmp_path):
    conf = tmp_path / "myconf" / "model"
    conf.mkdir(parents=True)
    (conf / "mine.yaml").write_text("name: mine\nrecptive_field: 3\n")
    result = run_cli(
        "cnnstudy-train", "--config-dir", str(tmp_path / "myconf"), "model=mine", cwd=tmp_path
    )
    assert result.returncode != 0
    assert "recptive_field" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("module", "argv"),
    [
        ("cnnstudy.run.train", ["model.stride=0"]),
        ("cnnstudy.network.describe", ["model.stride=0"]),
        ("cnnstudy.network.describe", []),
    ],
)
def test_checking_a_config_imports_no_heavy_library(module, argv):
    code = (
        "import sys\n"
        f"sys.argv = ['x', *{argv!r}]\n"
        f"from {module} import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "names = ('torch', 'lightning', 'torchvision', 'mlflow', 'optuna')\n"
        "heavy = [m for m in names if m in sys.modules]\n"
        "print('HEAVY', heavy, file=sys.stderr)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "HEAVY []" in result.stderr, result.stderr
