"""Where the configs live, and composing them as the Hydra app does."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from cnnstudy.config import schema  # noqa: F401 -- registers train_schema with Hydra
from cnnstudy.errors import ConfigError


def _shipped_or_checkout(name: str) -> Path:
    """A top-level folder of the repository (conf/, sweeps/) as shipped inside the installed
    package (a wheel), else the checkout's own (an editable install): the same files."""
    package = Path(__file__).resolve().parents[1]
    shipped = package / name
    return shipped if shipped.is_dir() else package.parents[1] / name


def config_dir() -> Path:
    return _shipped_or_checkout("conf")


def sweeps_dir() -> Path:
    return _shipped_or_checkout("sweeps")


CONFIG_DIR = config_dir()


def register_sweeps() -> None:
    """Every sweeps/NAME.yaml as the option NAME of the config group `sweep`, at the global
    package (a sweep file sets hydra.sweeper.* and any key of the run): `sweep=NAME`."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    store = ConfigStore.instance()
    for path in sorted(sweeps_dir().glob("*.yaml")):
        store.store(group="sweep", name=path.stem, node=OmegaConf.load(path), package="_global_")


register_sweeps()


def compose(overrides: list[str], config_dir: Path | str | None = None) -> DictConfig:
    """Compose train.yaml with command-line style overrides, as the Hydra app does.
    `config_dir`: a folder of the user's own, searched before cnnstudy's (--config-dir)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    if config_dir is not None and not Path(config_dir).is_dir():
        raise ConfigError(f"--config-dir {config_dir}: not a folder")
    extra = (
        [] if config_dir is None else [f"hydra.searchpath=[file://{Path(config_dir).resolve()}]"]
    )
    try:
        with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
            return hydra_compose("train", overrides=[*overrides, *extra])
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(str(err).strip()) from None
