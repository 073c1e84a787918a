"""Search spaces in Hydra's override grammar, as Optuna distributions.

    model.hidden_units: int(interval(16, 512))        -> IntDistribution(16, 512)
    optimizer.lr: tag(log, interval(1e-4, 1e-1))      -> FloatDistribution(1e-4, 0.1, log=True)
    model.receptive_field: choice(3, 5, 7)            -> CategoricalDistribution([3, 5, 7])
    model.filters: range(8, 40, step=8)               -> IntDistribution(8, 32, step=8)
    model.pool: max                                   -> fixed: every trial gets model.pool=max

`range` keeps Hydra's meaning: its stop is excluded. The same grammar as
hydra-optuna-sweeper's `params:`, so its sweep files keep working; the command line's
expressions override or extend the file's.
"""

from __future__ import annotations

import json
import math
from typing import Any

from cnnstudy.errors import ConfigError


def _choice(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    raise ConfigError(f"choice value {value!r}: valid are strings, numbers, booleans and null")


def distribution(key: str, override: Any) -> Any:
    """An Optuna distribution for one parsed sweep override."""
    from hydra.core.override_parser.types import (
        ChoiceSweep,
        IntervalSweep,
        RangeSweep,
        Transformer,
    )
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    value = override.value()
    if isinstance(value, ChoiceSweep) or (isinstance(value, RangeSweep) and value.shuffle):
        choices = [_choice(v) for v in override.sweep_iterator(transformer=Transformer.encode)]
        return CategoricalDistribution(choices)
    if isinstance(value, RangeSweep):
        start, stop, step = value.start, value.stop, value.step
        count = math.ceil((stop - start) / step)  # Hydra's range: stop excluded
        if count < 1:
            raise ConfigError(f"{key}=range({start}, {stop}, step={step}): holds no value")
        last = start + (count - 1) * step
        if all(isinstance(v, int) for v in (start, stop, step)):
            return IntDistribution(int(start), int(last), step=int(step))
        return FloatDistribution(float(start), float(last), step=float(step))
    if isinstance(value, IntervalSweep):
        start, end, log = value.start, value.end, "log" in value.tags
        if not start < end:
            raise ConfigError(f"{key}=interval({start}, {end}): the start must be below the end")
        if log and start <= 0:
            raise ConfigError(f"{key}=tag(log, interval({start}, {end})): log needs a start > 0")
        if isinstance(start, int) and isinstance(end, int):
            return IntDistribution(start, end, log=log)
        return FloatDistribution(float(start), float(end), log=log)
    raise ConfigError(f"{key}: this kind of sweep is not supported ({override.input_line})")


def parse(overrides: list[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """(search space: key -> distribution, fixed: key -> value) from override strings;
    a later override of the same key replaces an earlier one (the command line the file)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as err:
        raise ConfigError(f"search space: {err}") from None
    space: dict[str, Any] = {}
    fixed: dict[str, str] = {}
    for override in parsed:
        key = override.get_key_element()
        space.pop(key, None)
        fixed.pop(key, None)
        if override.is_sweep_override():
            space[key] = distribution(key, override)
        else:
            fixed[key] = override.get_value_element_as_str()
    return space, fixed


def describe(space: dict[str, Any]) -> str:
    """The space as stable JSON: what a study is tied to, and what MLflow records."""
    from optuna.distributions import distribution_to_json

    return json.dumps({k: json.loads(distribution_to_json(v)) for k, v in sorted(space.items())})


def grid(space: dict[str, Any]) -> dict[str, list[Any]]:
    """Every value of a discrete space, for the grid sampler (a plain comma multirun)."""
    from optuna.distributions import CategoricalDistribution, IntDistribution

    values: dict[str, list[Any]] = {}
    for key, dist in space.items():
        if isinstance(dist, CategoricalDistribution):
            values[key] = list(dist.choices)
        elif isinstance(dist, IntDistribution) and not dist.log:
            values[key] = list(range(dist.low, dist.high + 1, dist.step))
        else:
            raise ConfigError(f"{key}: the grid sampler needs choice(...) or range(...) values")
    return values


def override_value(value: Any) -> str:
    """A sampled value as a Hydra override value."""
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    return str(value)


def probe_values(space: dict[str, Any], most: int = 24) -> dict[str, list[Any]]:
    """Values to compose a config with, to find a key or value the config cannot take
    before the first trial: every choice of a categorical parameter (up to `most`), the
    ends of a numeric range."""
    from optuna.distributions import CategoricalDistribution

    probes = {}
    for key, dist in space.items():
        if isinstance(dist, CategoricalDistribution):
            probes[key] = list(dist.choices)[:most]
        else:
            probes[key] = [dist.low, dist.high]
    return probes
