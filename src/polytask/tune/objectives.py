"""What a trial is scored by, and the Pareto front.

- ``deltam``: the validation Δm% of the trial's best epoch (the checkpoint the run keeps) over
  the single-task baselines' validation metrics at their own best epochs; maximised. The same
  Δm% at every epoch is what the pruner sees.
- ``pareto``: every task's primary (first) validation metric at the best epoch, each in its own
  direction (maximise accuracy, minimise RMSE): a multi-objective study whose result is the set
  of non-dominated trials.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from polytask.evaluate import TaskMetrics, delta_m
from polytask.tasks import TaskSpec

__all__ = ["OBJECTIVES", "Objective", "best_record", "dominates", "pareto_front"]

OBJECTIVES = ("deltam", "pareto")


@dataclass(frozen=True)
class Objective:
    """How a finished (or running) trial is scored."""

    name: str
    tasks: tuple[TaskSpec, ...]
    baselines_val: TaskMetrics | None = None  # deltam: the baselines' validation metrics

    @property
    def multi(self) -> bool:
        return self.name == "pareto"

    def columns(self) -> list[tuple[str, str]]:
        """(task, metric) of each Pareto objective: every task's primary metric."""
        return [(t.name, t.metric_names[0]) for t in self.tasks]

    def labels(self) -> list[str]:
        """One name per objective value."""
        if self.multi:
            return [f"{task} {metric}" for task, metric in self.columns()]
        return ["val Δm%"]

    def directions(self) -> list[str]:
        """Optuna's ``maximize``/``minimize`` per objective value."""
        if not self.multi:
            return ["maximize"]
        return [
            "maximize" if task.higher_is_better(metric) else "minimize"
            for task, (_, metric) in zip(self.tasks, self.columns(), strict=True)
        ]

    def values(self, val: TaskMetrics) -> list[float]:
        """The objective value(s) of validation metrics ``val``."""
        if not self.multi:
            return [self.delta_m(val)]
        return [float(val.get(task, {}).get(metric, math.nan)) for task, metric in self.columns()]

    def delta_m(self, val: TaskMetrics) -> float:
        """Validation Δm% of ``val`` over the baselines' validation metrics."""
        if self.baselines_val is None:
            raise ValueError("the deltam objective needs the baselines' validation metrics")
        return delta_m(val, self.baselines_val, self.tasks)


def best_record(history: Sequence[Mapping[str, Any]], best_epoch: int) -> Mapping[str, Any]:
    """The epoch record of ``best_epoch`` in a run's history (``metrics.jsonl`` records)."""
    for record in history:
        if record.get("epoch") == best_epoch:
            return record
    raise ValueError(f"epoch {best_epoch} is not in the run's history")


def dominates(a: Sequence[float], b: Sequence[float], directions: Sequence[str]) -> bool:
    """Whether ``a`` is at least as good as ``b`` in every objective and better in one.

    >>> dominates([0.9, 1.0], [0.8, 1.0], ["maximize", "minimize"])
    True
    >>> dominates([0.9, 2.0], [0.8, 1.0], ["maximize", "minimize"])
    False
    """
    signs = [1.0 if d == "maximize" else -1.0 for d in directions]
    better = [s * x for s, x in zip(signs, a, strict=True)]
    other = [s * y for s, y in zip(signs, b, strict=True)]
    return all(x >= y for x, y in zip(better, other, strict=True)) and any(
        x > y for x, y in zip(better, other, strict=True)
    )


def pareto_front(points: Sequence[Sequence[float]], directions: Sequence[str]) -> list[int]:
    """Indices of the non-dominated points (points with a NaN are never on the front); equal
    points are all kept.

    >>> pareto_front([[1, 1], [2, 0], [0, 2], [0.5, 0.5]], ["maximize", "maximize"])
    [0, 1, 2]
    """
    finite = [i for i, p in enumerate(points) if all(math.isfinite(v) for v in p)]
    return [
        i
        for i in finite
        if not any(dominates(points[j], points[i], directions) for j in finite if j != i)
    ]
