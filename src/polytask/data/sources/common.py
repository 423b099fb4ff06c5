"""Helpers shared by the dataset builders: seeded random streams, hidden labels, names."""

from __future__ import annotations

import re

import numpy as np

from polytask.errors import ConfigError
from polytask.tasks import TaskSpec

#: random stream reserved for ``hide_labels`` (builders use small stream numbers for their data)
HIDE_STREAM = 1_000


def rng_for(seed: int, stream: int) -> np.random.Generator:
    """An independent generator per (seed, stream), so that changing one part of a dataset (for
    example ``missing_fraction``) leaves the other parts identical."""
    return np.random.default_rng([stream, seed & 0xFFFF_FFFF_FFFF_FFFF])


def check_fraction(name: str, value: float) -> None:
    """``ConfigError`` unless ``0 <= value < 1``."""
    if not 0.0 <= value < 1.0:
        raise ConfigError(f"{name} must be in [0, 1), found {value}")


def check_minimums(source: str, values: dict[str, tuple[int, int]]) -> None:
    """``ConfigError`` naming every parameter of ``values`` (name → (value, lowest allowed))
    below its lowest value, as ``"<source>: num_x must be >= 1, found 0; ..."``."""
    problems = [
        f"{name} must be >= {low}, found {value}"
        for name, (value, low) in values.items()
        if value < low
    ]
    if problems:
        raise ConfigError(f"{source}: " + "; ".join(problems))


def hide_labels(
    targets: dict[str, np.ndarray], tasks: list[TaskSpec], *, fraction: float, seed: int
) -> dict[str, np.ndarray]:
    """A copy of ``targets`` where ``round(fraction * N)`` random samples per task (drawn
    independently for each task) have their label hidden: ``-1`` for multiclass, ``NaN``
    otherwise (the whole label vector of a multilabel or vector-regression sample)."""
    check_fraction("missing_fraction", fraction)
    if fraction == 0.0:
        return targets
    rng = rng_for(seed, HIDE_STREAM)
    out = dict(targets)
    for task in tasks:
        y = targets[task.name].copy()
        hidden = rng.choice(len(y), size=round(fraction * len(y)), replace=False)
        y[hidden] = -1 if task.kind == "multiclass" else np.nan
        out[task.name] = y
    return out


def sanitize(name: str) -> str:
    """A column name as a task or feature name: lower case, runs of other characters → ``_``."""
    return re.sub(r"[^0-9a-z]+", "_", name.lower()).strip("_")
