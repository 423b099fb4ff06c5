"""The search space of ``polytask tune``: a YAML mapping from dotted configuration fields to
distributions, validated like a configuration.

Syntax (one entry per field; the field is its dotted name in the run configuration)::

    optimizer.lr: {log_uniform: [1.0e-4, 1.0e-2]}   # float, sampled on a log scale
    optimizer.weight_decay: {uniform: [0.0, 0.1]}    # float, uniform
    train.epochs: {int: [3, 8]}                      # integer, both ends included
    model.architecture: {choice: [hard_sharing, mmoe]}
    data.task_weights.task_0: {uniform: [0.1, 10]}
    balancing.method:                                # a choice with conditional parameters:
      choice:                                        # each option maps to the sub-space that
        equal: {}                                    # is sampled only when it is chosen
        nash_mtl:
          balancing.params.update_weights_every: {int: [1, 5]}

Choosing a new ``balancing.method``, ``model.architecture``, ``model.encoder``, ``model.head`` or
``data.sampler.name`` drops the base configuration's parameters of the old one (its ``params``)
before the sampled parameters are set. A field may appear under several options only with the
same distribution (it is one Optuna parameter). Every problem is reported in one
``ConfigError`` naming the field; every value a distribution can take at its ends (and every
option of a choice) is checked by building the configuration with it (``parse_config``).
"""

from __future__ import annotations

import copy
import json
import math
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from polytask.config import RunConfig, parse_config, read_yaml_file
from polytask.errors import ConfigError

__all__ = ["KINDS", "PARAMS_OF", "SPACES_DIR", "Param", "SearchSpace", "load_space", "parse_space"]

#: the distribution kinds of a space entry
KINDS = ("log_uniform", "uniform", "int", "choice")

#: a field that names a component, and the field holding that component's parameters (reset
#: when a trial picks another component than the base configuration's)
PARAMS_OF = {
    "balancing.method": "balancing.params",
    "model.architecture": "model.architecture_params",
    "model.encoder": "model.encoder_params",
    "model.head": "model.head_params",
    "data.sampler.name": "data.sampler.params",
}

#: the search spaces that ship with polytask, next to the recipes
SPACES_DIR = Path(__file__).resolve().parents[1] / "recipes" / "spaces"

_PRIMITIVE = (str, int, float, bool, type(None))


@dataclass(frozen=True)
class Param:
    """One searched field: its distribution and, for a choice with conditional parameters, the
    sub-space of each option (``branches[i]`` belongs to ``choices[i]``)."""

    field: str
    kind: str
    low: float = 0.0
    high: float = 0.0
    choices: tuple[Any, ...] = ()
    branches: tuple[tuple[Param, ...], ...] = ()

    @property
    def encoded(self) -> bool:
        """Choices that Optuna cannot store as they are (lists, mappings) are stored as JSON."""
        return any(not isinstance(c, _PRIMITIVE) for c in self.choices)

    def distribution(self) -> Any:
        """The Optuna distribution of this parameter."""
        from optuna.distributions import (
            CategoricalDistribution,
            FloatDistribution,
            IntDistribution,
        )

        if self.kind == "choice":
            return CategoricalDistribution([self.encode(c) for c in self.choices])
        if self.kind == "int":
            return IntDistribution(int(self.low), int(self.high))
        return FloatDistribution(self.low, self.high, log=self.kind == "log_uniform")

    def encode(self, value: Any) -> Any:
        return json.dumps(value, sort_keys=True) if self.encoded else value

    def decode(self, stored: Any) -> Any:
        return json.loads(stored) if self.encoded else stored

    def signature(self) -> tuple[Any, ...]:
        """What must agree where one field is searched under several options."""
        return (self.kind, self.low, self.high, tuple(map(self.encode, self.choices)))


@dataclass(frozen=True)
class SearchSpace:
    """A validated search space: top-level parameters (each with its conditional sub-spaces)."""

    params: tuple[Param, ...]
    source: str = "space"
    text: str = field(default="", compare=False)

    def sample(self, trial: Any) -> dict[str, Any]:
        """Ask an Optuna trial for every parameter that applies; dotted field → value."""
        values: dict[str, Any] = {}
        _sample(trial, self.params, values)
        return values

    def values_of(self, stored: Mapping[str, Any]) -> dict[str, Any]:
        """The configuration values of a finished trial's ``params`` (as Optuna stored them)."""
        values: dict[str, Any] = {}
        _decode(self.params, stored, values)
        return values

    def config(
        self, base: Mapping[str, Any], values: Mapping[str, Any], *, source: str
    ) -> RunConfig:
        """The base configuration (a raw mapping) with ``values`` set, validated."""
        return parse_config(apply_values(base, values), source=source)

    def fields(self) -> list[str]:
        """Every searched field, conditional ones included, in order of appearance."""
        found: list[str] = []
        _walk_fields(self.params, found)
        return found


def apply_values(base: Mapping[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy of ``base`` with each dotted field of ``values`` set; a component changed
    from the base's (``PARAMS_OF``) first loses the base's parameters."""
    raw = copy.deepcopy(dict(base))
    for name, params_field in PARAMS_OF.items():
        if name in values and values[name] != _get(raw, name):
            _set(raw, params_field, {})
    for name, value in values.items():
        _set(raw, name, copy.deepcopy(value))
    return raw


def _get(raw: Mapping[str, Any], dotted: str) -> Any:
    node: Any = raw
    for part in dotted.split("."):
        if not isinstance(node, Mapping):
            return None
        node = node.get(part)
    return node


def _set(raw: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[parts[-1]] = value


def _sample(trial: Any, params: Sequence[Param], values: dict[str, Any]) -> None:
    for param in params:
        if param.kind == "choice":
            stored = trial.suggest_categorical(
                param.field, [param.encode(c) for c in param.choices]
            )
            value = param.decode(stored)
            values[param.field] = value
            if param.branches:
                _sample(trial, param.branches[param.choices.index(value)], values)
        elif param.kind == "int":
            values[param.field] = trial.suggest_int(param.field, int(param.low), int(param.high))
        else:
            values[param.field] = trial.suggest_float(
                param.field, param.low, param.high, log=param.kind == "log_uniform"
            )


def _decode(params: Sequence[Param], stored: Mapping[str, Any], values: dict[str, Any]) -> None:
    for param in params:
        if param.field not in stored:
            continue
        value = param.decode(stored[param.field]) if param.kind == "choice" else stored[param.field]
        values[param.field] = value
        if param.branches:
            _decode(param.branches[param.choices.index(value)], stored, values)


def _walk_fields(params: Sequence[Param], found: list[str]) -> None:
    for param in params:
        if param.field not in found:
            found.append(param.field)
        for branch in param.branches:
            _walk_fields(branch, found)


# ----------------------------------------------------------------------------- parsing
def load_space(path: str | Path, base: Mapping[str, Any]) -> SearchSpace:
    """Read and validate the search space at ``path`` (or the shipped space of that name, in
    ``polytask/recipes/spaces/``) against the base configuration ``base`` (a raw mapping, e.g.
    ``config_to_dict(config)``)."""
    path = Path(path)
    shipped = SPACES_DIR / f"{path}.yaml"
    if not path.is_file() and shipped.is_file():
        path = shipped
    if not path.is_file():
        names = sorted(p.stem for p in SPACES_DIR.glob("*.yaml"))
        raise ConfigError(
            f"{path}: no such search space file (nor a shipped space: {', '.join(names)})"
        )
    raw = read_yaml_file(path, what="search space file")
    space = parse_space(raw, base, source=str(path))
    return SearchSpace(space.params, source=str(path), text=yaml.safe_dump(raw, sort_keys=False))


def parse_space(raw: Any, base: Mapping[str, Any], *, source: str = "space") -> SearchSpace:
    """Validate a parsed search space; one ``ConfigError`` lists every problem, each naming the
    field."""
    if not isinstance(raw, dict) or not raw:
        found = "an empty file" if not raw else type(raw).__name__
        raise ConfigError(
            f"{source}: the search space must be a mapping of dotted config fields to "
            f"distributions, e.g. 'optimizer.lr: {{log_uniform: [1.0e-4, 1.0e-2]}}'; found {found}"
        )
    problems: list[str] = []
    params = _parse_entries(raw, problems, where="")
    seen: dict[str, tuple[Any, ...]] = {}
    _check_repeats(params, seen, problems)
    _check_values(params, dict(base), {}, problems)
    if problems:
        raise ConfigError(_format(source, problems))
    return SearchSpace(tuple(params), source=source)


def _format(source: str, problems: list[str]) -> str:
    if len(problems) == 1:
        return f"{source}: {problems[0]}"
    return f"{source}: {len(problems)} problems:\n" + "\n".join(f"  - {p}" for p in problems)


def _parse_entries(raw: Mapping[Any, Any], problems: list[str], *, where: str) -> list[Param]:
    params = []
    for name, spec in raw.items():
        label = f"{where}{name}"
        if not isinstance(name, str):
            problems.append(f"{label}: a field is a dotted name such as optimizer.lr")
            continue
        problem = field_problem(name)
        if problem:
            problems.append(f"{label}: {problem}")
            continue
        param = _parse_param(name, spec, problems, label=label)
        if param is not None:
            params.append(param)
    return params


def _parse_param(name: str, spec: Any, problems: list[str], *, label: str) -> Param | None:
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in KINDS:
        problems.append(
            f"{label}: expected one of {{log_uniform: [low, high]}}, {{uniform: [low, high]}}, "
            f"{{int: [low, high]}}, {{choice: [...]}}; found {spec!r}"
        )
        return None
    kind, arguments = next(iter(spec.items()))
    if kind == "choice":
        return _parse_choice(name, arguments, problems, label=label)
    if not (
        isinstance(arguments, list)
        and len(arguments) == 2
        and all(isinstance(v, int | float) and not isinstance(v, bool) for v in arguments)
    ):
        problems.append(f"{label}: {kind} takes [low, high] (two numbers); found {arguments!r}")
        return None
    low, high = arguments
    if not all(math.isfinite(v) for v in (low, high)) or low >= high:
        problems.append(f"{label}: {kind} needs finite low < high; found [{low}, {high}]")
        return None
    if kind == "log_uniform" and low <= 0:
        problems.append(f"{label}: log_uniform needs low > 0; found {low}")
        return None
    if kind == "int" and not all(isinstance(v, int) for v in (low, high)):
        problems.append(f"{label}: int takes whole numbers; found [{low}, {high}]")
        return None
    return Param(name, kind, low=low, high=high)


def _parse_choice(name: str, arguments: Any, problems: list[str], *, label: str) -> Param | None:
    if isinstance(arguments, list):
        if not arguments:
            problems.append(f"{label}: choice needs at least one option")
            return None
        twice = [c for i, c in enumerate(arguments) if c in arguments[:i]]
        if twice:
            problems.append(f"{label}: choice lists {twice[0]!r} more than once")
            return None
        return Param(name, "choice", choices=tuple(arguments))
    if not isinstance(arguments, dict) or not arguments:
        problems.append(
            f"{label}: choice takes a list of options, or a mapping of each option to the "
            f"sub-space sampled when it is chosen ({{}} for none); found {arguments!r}"
        )
        return None
    branches = []
    for option, sub in arguments.items():
        if sub is None:
            sub = {}
        if not isinstance(sub, dict):
            problems.append(
                f"{label}: option {option!r} maps to {sub!r}; expected a sub-space mapping "
                "(dotted field: distribution), or {} for none"
            )
            return None
        branches.append(tuple(_parse_entries(sub, problems, where=f"{label}[{option}].")))
    return Param(name, "choice", choices=tuple(arguments), branches=tuple(branches))


def field_problem(name: str) -> str | None:
    """Why ``name`` is not a dotted field of the run configuration, or ``None``.

    >>> field_problem("optimizer.lr") is None, field_problem("balancing.params.anything") is None
    (True, True)
    >>> print(field_problem("optimizer.rate"))  # doctest: +NORMALIZE_WHITESPACE
    unknown config field: 'rate' is not a field of optimizer (known: betas, lr, momentum,
    name, weight_decay)
    """
    model: type[BaseModel] = RunConfig
    parts = name.split(".")
    for i, part in enumerate(parts):
        info = model.model_fields.get(part)
        where = ".".join(parts[:i]) or "the configuration"
        if info is None:
            known = ", ".join(sorted(model.model_fields))
            return f"unknown config field: {part!r} is not a field of {where} (known: {known})"
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
            if i == len(parts) - 1:
                return f"{name} is a section; search its fields (e.g. {name}.<field>)"
            continue
        if typing.get_origin(annotation) is dict or i == len(parts) - 1:
            return None  # a mapping of free keys (params, task_weights) or a leaf
        return f"{'.'.join(parts[: i + 1])} has no sub-fields"
    return None


def _check_repeats(
    params: Sequence[Param], seen: dict[str, tuple[Any, ...]], problems: list[str]
) -> None:
    for param in params:
        signature = param.signature()
        if seen.setdefault(param.field, signature) != signature:
            problems.append(
                f"{param.field}: searched more than once with different distributions; one "
                "field is one parameter of the study, so give it the same distribution everywhere"
            )
        for branch in param.branches:
            _check_repeats(branch, seen, problems)


def _check_values(
    params: Sequence[Param],
    base: dict[str, Any],
    fixed: dict[str, Any],
    problems: list[str],
) -> None:
    """Build the configuration with each end of every range and every option of every choice
    (under the options that enable it) and report what ``parse_config`` refuses."""
    for param in params:
        candidates = list(param.choices) if param.kind == "choice" else [param.low, param.high]
        if param.kind == "int":
            candidates = [int(v) for v in candidates]
        for index, value in enumerate(candidates):
            values = {**fixed, param.field: value}
            try:
                parse_config(apply_values(base, values), source="config")
            except ConfigError as exc:
                why = " ".join(str(exc).removeprefix("config: ").split())
                under = "".join(f" with {k}={v!r}" for k, v in fixed.items())
                if not any(
                    p.startswith(f"{param.field}: ")
                    and p.endswith(f"{under} makes an invalid config ({why})")
                    for p in problems
                ):  # once per reason
                    problems.append(
                        f"{param.field}: {value!r}{under} makes an invalid config ({why})"
                    )
                continue
            if param.branches:
                _check_values(param.branches[index], base, values, problems)
