"""The Hydra plugin: `hydra/sweeper: cnnstudy`. Thin: settings in, cnnstudy.study.loop runs
the study. Hydra finds it by importing every module under the hydra_plugins namespace
(without registering the module in sys.modules: no `from __future__ import annotations`
here, the dataclass needs its annotations evaluated)."""

from dataclasses import dataclass, field
from typing import Any

from hydra._internal.core_plugins.basic_launcher import BasicLauncherConf
from hydra.core.config_store import ConfigStore
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict


@dataclass
class CnnstudySweeperConf:
    """The study's settings, under hydra.sweeper (README: Studies)."""

    _target_: str = "hydra_plugins.cnnstudy_sweeper.sweeper.CnnstudySweeper"
    _recursive_: bool = False  # sampler and pruner are built by the study, seeds adjusted
    # `override hydra/sweeper/sampler: tpe` (hydra-optuna-sweeper's group) works too
    defaults: list[Any] = field(default_factory=lambda: ["_self_", {"sampler": None}])
    study_name: str | None = None  # default: the sweep file's name, or the multirun's command
    storage: str | None = None  # default: sqlite:///optuna.db in the current folder
    n_trials: int | None = None  # finished trials in total, over every run; default 20 (grid: all)
    objective: Any = "val/acc"  # a validation metric, or a list of them
    direction: Any = "maximize"  # or minimize; a list for several objectives
    directions: Any = None  # hydra-optuna-sweeper's spelling of a list of directions
    # a name (tpe, random, grid, gp, cmaes, nsgaii, qmc), {name: ..., args}, {_target_: ...}
    # or {hub: PACKAGE, class: NAME}; default: grid for a plain comma multirun, else tpe
    sampler: Any = None
    pruner: Any = None  # a name (median, percentile, successive_halving, hyperband, wilcoxon)
    params: dict[str, str] | None = None  # search space, Hydra's override grammar
    enqueue: list[Any] = field(default_factory=list)  # trials run first ({key: value})
    seeds: int = 1  # seeds per sampled configuration; the objective is their mean
    max_failures: int = 5  # failed trials (not rejected architectures) before stopping
    max_rejected: int = 50  # trials in a row rejected by the shape check before stopping
    retry_failed: int = 0  # times a trial whose process died is run again, same parameters
    n_jobs: int = 1  # trials at once: worker processes with cores / n_jobs threads each
    max_failure_rate: float | None = None  # hydra-optuna-sweeper's key: accepted, unused
    question: str | None = None  # the question the study answers (its report's title)
    scientific: list[str] = field(default_factory=list)  # what the question is about
    nuisance: list[str] = field(default_factory=list)  # tuned at each scientific setting
    # the first categorical scientific parameter's settings get trials in turn (one
    # objective, not grid); the sampler chooses the rest
    balance: bool = True
    report: bool = True  # write the report (HTML + PNG) at the end of every run
    search_space: Any = None  # hydra-optuna-sweeper's old key: use params
    custom_search_space: Any = None  # hydra-optuna-sweeper's: not supported


ConfigStore.instance().store(
    group="hydra/sweeper", name="cnnstudy", node=CnnstudySweeperConf, provider="cnnstudy"
)


def _store_samplers() -> None:
    from cnnstudy.study.samplers import SAMPLERS, UNSEEDED

    for name, target in SAMPLERS.items():
        node = {"_target_": target} if name in UNSEEDED else {"_target_": target, "seed": 0}
        ConfigStore.instance().store(
            group="hydra/sweeper/sampler", name=name, node=node, provider="cnnstudy"
        )


_store_samplers()


class CnnstudySweeper(Sweeper):
    def __init__(self, **settings: Any) -> None:
        self.settings = settings
        self.config: DictConfig | None = None

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        import os

        self.config = config
        self.hydra_context = hydra_context
        launching = config
        if os.environ.get("CNNSTUDY_STUDY_JOB") == "1":
            # a worker job of a study (cnnstudy.study.jobs): its trials run in its own
            # process, whatever launcher the command names (the one that submitted it)
            launching = OmegaConf.create(OmegaConf.to_container(config, resolve=False))
            with open_dict(launching):
                launching.hydra.launcher = OmegaConf.structured(BasicLauncherConf)
        self.launcher = Plugins.instance().instantiate_launcher(
            config=launching, hydra_context=hydra_context, task_function=task_function
        )

    def sweep(self, arguments: list[str]) -> Any:
        import sys

        from cnnstudy.errors import EXIT_USER_ERROR, ConfigError, report

        try:
            return self._sweep(arguments)
        except ConfigError as err:  # one line and exit 2, as every cnnstudy user error
            report(err)
            sys.exit(EXIT_USER_ERROR)

    def _sweep(self, arguments: list[str]) -> Any:
        from cnnstudy.errors import ConfigError
        from cnnstudy.study.loop import Settings, StudyRunner

        raw = {
            k: (OmegaConf.to_container(v) if isinstance(v, DictConfig) else v)
            for k, v in self.settings.items()
        }
        if raw.pop("custom_search_space", None):
            raise ConfigError("hydra.sweeper.custom_search_space: not supported; use params")
        if raw.get("search_space") and not raw.get("params"):
            raise ConfigError("hydra.sweeper.search_space: the old form; write params instead")
        raw.pop("search_space", None)
        raw["params"] = raw.get("params") or {}
        settings = Settings(**raw)
        if not self.config.hydra.verbose:  # one line per trial; hydra.verbose=true: all
            from cnnstudy.log import quiet_libraries

            quiet_libraries()
        runner = StudyRunner(settings, self.config, self.launcher, self.hydra_context.config_loader)
        return runner.run(list(arguments))
