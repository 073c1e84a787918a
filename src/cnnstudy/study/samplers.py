"""Samplers and pruners by name, by `_target_`, or from OptunaHub.

    sampler: tpe                                   # a name: seeded with 0
    sampler: {name: cmaes, seed: 3, sigma0: 0.5}   # a name and its arguments
    sampler: {_target_: optuna.samplers.TPESampler, seed: 1, n_startup_trials: 5}
    sampler: {hub: samplers/auto_sampler, class: AutoSampler}   # OptunaHub (optunahub)
    pruner: median                                 # likewise; none: no pruning

A seeded sampler rebuilt when a study resumes gets its seed plus the number of trials
already in the study, so that it does not repeat the draws of the trials before it.
"""

from __future__ import annotations

from typing import Any

from cnnstudy.errors import ConfigError

SAMPLERS = {
    "tpe": "optuna.samplers.TPESampler",
    "random": "optuna.samplers.RandomSampler",
    "grid": "optuna.samplers.GridSampler",
    "gp": "optuna.samplers.GPSampler",
    "cmaes": "optuna.samplers.CmaEsSampler",
    "nsgaii": "optuna.samplers.NSGAIISampler",
    "nsga2": "optuna.samplers.NSGAIISampler",
    "nsgaiii": "optuna.samplers.NSGAIIISampler",
    "qmc": "optuna.samplers.QMCSampler",
    "bruteforce": "optuna.samplers.BruteForceSampler",
    "motpe": "optuna.samplers.TPESampler",  # hydra-optuna-sweeper's; TPE does several objectives
}
UNSEEDED = {"grid"}  # GridSampler's seed shuffles its order: off unless given

PRUNERS = {
    "median": "optuna.pruners.MedianPruner",
    "percentile": "optuna.pruners.PercentilePruner",
    "successive_halving": "optuna.pruners.SuccessiveHalvingPruner",
    "hyperband": "optuna.pruners.HyperbandPruner",
    "wilcoxon": "optuna.pruners.WilcoxonPruner",
    "threshold": "optuna.pruners.ThresholdPruner",
    "none": "optuna.pruners.NopPruner",
    "nop": "optuna.pruners.NopPruner",
}
PRUNER_DEFAULTS = {"percentile": {"percentile": 25.0}}  # its one required argument


def _named(kind: str, node: Any, table: dict[str, str]) -> dict[str, Any]:
    """`node` (a name, {name: ..., args}, or {_target_: ..., args}) as {_target_, args}."""
    if isinstance(node, str):
        node = {"name": node}
    if not isinstance(node, dict):
        raise ConfigError(
            f"hydra.sweeper.{kind}={node!r}: give a name ({', '.join(table)}) "
            "or a mapping with _target_"
        )
    node = dict(node)
    name = node.pop("name", None)
    if name is not None:
        key = str(name).lower().replace("-", "_")
        if key not in table:
            raise ConfigError(
                f"hydra.sweeper.{kind}={name}: unknown {kind}; valid names: {', '.join(table)}, "
                "or a mapping with _target_ (any optuna class)"
            )
        if kind == "sampler" and key not in UNSEEDED:
            node.setdefault("seed", 0)
        if kind == "pruner":
            node = {**PRUNER_DEFAULTS.get(key, {}), **node}
        node["_target_"] = table[key]
    return node


def spec(kind: str, node: Any) -> dict[str, Any] | None:
    """The sampler or pruner setting as plain {_target_: ..., args} (None: the default)."""
    if node is None:
        return None
    if isinstance(node, dict) and "hub" in node:
        return dict(node)
    node = _named(kind, node, SAMPLERS if kind == "sampler" else PRUNERS)
    if not node.get("_target_"):
        return None
    return node


def is_grid(node: dict[str, Any] | None) -> bool:
    return node is not None and str(node.get("_target_", "")).endswith("GridSampler")


def build_sampler(
    node: dict[str, Any], *, trials_before: int, grid: Any = None, process: int = 0
) -> Any:
    """The sampler `node` describes. A seeded one is reseeded from its seed, the trials
    the study holds and the number of the process among those that joined the study:
    a resumed study does not repeat the draws before it, and two processes working on one
    study do not draw the same sequence; the same history gives the same seeds."""
    node = dict(node)
    if node.get("seed") is not None:
        import numpy as np

        entropy = [int(node["seed"]), trials_before, process]
        if trials_before == 0 and process == 0:
            node["seed"] = int(node["seed"])  # a new study's first process: the seed given
        else:
            node["seed"] = int(np.random.SeedSequence(entropy).generate_state(1)[0] >> 1)
    if is_grid(node):
        node["search_space"] = grid
        if node["_target_"] == SAMPLERS["grid"]:
            node["_target_"] = f"{__name__}.GridSampler"
    if "hub" in node:
        return _from_hub(node)
    return _instantiate("sampler", node)


def try_sampler(
    node: dict[str, Any], space: dict[str, Any], directions: list[str], grid: Any
) -> None:
    """Build the sampler and let it draw one trial of an in-memory study: arguments of the
    wrong type fail here, in a line, not after the first trial has trained."""
    import warnings

    import optuna

    sampler = build_sampler(node, trials_before=0, grid=grid)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            study = optuna.create_study(directions=directions, sampler=sampler)
            study.ask(fixed_distributions=space)
    except (TypeError, ValueError, AttributeError) as err:
        shown = {k: v for k, v in node.items() if k != "search_space"}
        raise ConfigError(
            f"hydra.sweeper.sampler={shown}: {node.get('_target_', 'the sampler')} cannot "
            f"draw a trial: {type(err).__name__}: {err}. Valid: the arguments its "
            "constructor takes, of their types"
        ) from None


def build_pruner(node: dict[str, Any] | None) -> Any:
    import optuna

    if node is None:
        return optuna.pruners.NopPruner()
    return _instantiate("pruner", node)


def _instantiate(kind: str, node: dict[str, Any]) -> Any:
    import warnings

    import optuna
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        with warnings.catch_warnings():  # QMC, NSGA-III, Wilcoxon, ...: said once, in README
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return instantiate(node, _convert_="all")
    except InstantiationException as err:
        cause = err.__cause__ or err
        raise ConfigError(
            f"hydra.sweeper.{kind}: {node['_target_']} could not be built: "
            f"{type(cause).__name__}: {str(cause).strip().splitlines()[-1]}"
        ) from None


def _from_hub(node: dict[str, Any]) -> Any:
    """An OptunaHub sampler: `hub` names the package, `class` its sampler class;
    `registry_root` a local copy of a registry (offline), else optunahub downloads it."""
    try:
        import optunahub
    except ImportError:
        raise ConfigError(
            "hydra.sweeper.sampler.hub: OptunaHub samplers need the optunahub package; "
            "pip install optunahub"
        ) from None
    package = node.pop("hub")
    class_name = node.pop("class", None)
    root = node.pop("registry_root", None)
    node.pop("_target_", None)
    if not class_name:
        raise ConfigError(
            f"hydra.sweeper.sampler.hub={package}: give class, the sampler class the package "
            "exports (e.g. class: AutoSampler)"
        )
    try:
        module = (
            optunahub.load_local_module(package, registry_root=str(root))
            if root
            else optunahub.load_module(package)
        )
    except Exception as err:  # noqa: BLE001 -- a missing package or no network: said plainly
        where = f"in {root}" if root else "from the OptunaHub registry"
        raise ConfigError(
            f"hydra.sweeper.sampler.hub={package}: could not load it {where}: "
            f"{type(err).__name__}: {err}"
        ) from None
    cls = getattr(module, str(class_name), None)
    if cls is None:
        raise ConfigError(
            f"hydra.sweeper.sampler.class={class_name}: {package} has no such class; it has "
            f"{', '.join(n for n in dir(module) if n[:1].isupper())}"
        )
    return cls(**node)


def __getattr__(name: str) -> Any:
    if name == "GridSampler":  # built on first use: importing optuna is not free
        return _grid_sampler()
    raise AttributeError(name)


def _grid_sampler() -> type:
    import optuna

    class GridSampler(optuna.samplers.GridSampler):
        """Optuna's grid sampler, where the study loop decides when the grid is done:
        Optuna's after_trial calls study.stop(), which works only inside study.optimize
        (and fails for a combination queued again after it failed)."""

        def after_trial(self, study: Any, trial: Any, state: Any, values: Any) -> None:
            return None

    GridSampler.__module__ = __name__
    globals()["GridSampler"] = GridSampler
    return GridSampler
