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
    (["optimizer.lr=fast"], ["optimizer.lr=fast", "positive number"]),
    (["optimizer.lr=null"], ["optimizer.lr=None", "positive number"]),
    (["trainer.devices=banana"], ["trainer.devices=banana", "valid: 1, auto"]),
    (["trainer.devices=0"], ["trainer.devices=0", "N > 1", "DDP"]),
    (["trainer.devices=2", "trainer.strategy=ddp"], ["trainer.strategy=ddp", "ddp_spawn"]),
    (["trainer.limit_train_batches=0"], ["limit_train_batches=0", "cannot be skipped"]),
    (["trainer.num_nodes=0"], ["trainer.num_nodes=0", "at least 1"]),
    (
        ["trainer.num_nodes=2", "trainer.strategy=ddp_spawn"],
        ["trainer.strategy=ddp_spawn", "srun", "valid: auto"],
    ),
    (
        ["model=lenet5", "model.filters_per_stage=[8,16]"],
        ["model.filters=6", "cannot take effect", "model.filters_per_stage=[8, 16]"],
    ),
    (
        ["model.hidden_units_per_layer=[64]"],
        ["model.hidden_units=200", "cannot take effect", "model.hidden_units=null"],
    ),
    (["model.filters=null"], ["model.filters=None", "model.filters_per_stage"]),
    (
        ["+logger.tag={api_token:abc123secret}"],
        ["logger.tag={'api_token': '***'}", "did you mean logger.tags"],
    ),
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
    assert "abc123secret" not in message
    assert list(tmp_path.iterdir()) == []  # no store, no outputs/ folder


# (overrides, environment, words): found with torch (optimizer, accelerator) or by reading
# a file or the store, still before the data is loaded and before an MLflow run exists
TRAIN_CASES = [
    (
        ["+optimizer.betas=[0.9]"],
        {},
        ["optimizer._target_=torch.optim.Adam", "betas", "IndexError"],
    ),
    (["optimizer._target_=torch.optim.Bogus"], {}, ["torch.optim.Bogus", "No module named"]),
    (["+optimizer.momentum=0.9"], {}, ["Adam", "unexpected keyword argument 'momentum'"]),
    (["scheduler.pct_start=7"], {}, ["scheduler._target_=torch.optim.lr_scheduler.OneCycleLR"]),
    (["model.hidden_units=100000000"], {}, ["fc1", "100000000x1960", "GiB", "data.batch_size"]),
    (
        ["logger.tracking_uri=postgresql://user:s3cr3t@127.0.0.1:1/db"],
        {},
        ["postgresql://user:***@127.0.0.1:1/db", "driver"],
    ),
    (
        [],
        {"MLFLOW_TRACKING_URI": "sqlite:////proc/x.db"},
        ["sqlite:////proc/x.db", "cannot create"],
    ),
    (["logger.tracking_uri=http://127.0.0.1:1"], {}, ["nothing answers at 127.0.0.1:1"]),
    (
        ["trainer.num_nodes=2"],
        {},
        ["trainer.num_nodes=2", "srun --nodes=2 --ntasks-per-node=1", "SLURM_NTASKS unset"],
    ),
    (
        ["trainer.num_nodes=2", "trainer.devices=2", "trainer.accelerator=cpu"],
        {"SLURM_NTASKS": "2", "SLURM_PROCID": "0"},
        ["needs 4 srun tasks", "SLURM_NTASKS=2"],
    ),
]


@pytest.mark.parametrize(
    ("overrides", "env", "words"),
    TRAIN_CASES,
    ids=[" ".join(c[0]) or str(c[1]) for c in TRAIN_CASES],
)
def test_train_refuses_before_any_run_exists(tmp_path, overrides, env, words):
    result = run_cli("cnnstudy-train", "trainer=smoke", *overrides, cwd=tmp_path, env=env)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr + result.stdout
    message = result.stderr.strip()
    assert message.startswith("cnnstudy: error: ") and message.count("\n") == 0, message
    for word in words:
        assert word in message
    assert "s3cr3t" not in result.stderr + result.stdout
    assert list(tmp_path.iterdir()) == []  # no store, no outputs/ folder, no run


def test_a_gpu_asked_for_on_a_machine_without_one_is_a_config_error(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = run_cli("cnnstudy-train", "trainer.accelerator=gpu", cwd=tmp_path)
    assert result.returncode == 2
    assert "trainer.accelerator=gpu: torch sees no CUDA GPU" in result.stderr
    assert "Traceback" not in result.stderr and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ("model.fitlers=8", ["model.fitlers", "not in 'ModelConfig'"]),
        ("model.stride=two", ["model.stride=two", "whole number >= 1", "one per axis (H, W)"]),
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
        ("cnnstudy.describe", ["model.stride=0"]),
        ("cnnstudy.describe", []),
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
