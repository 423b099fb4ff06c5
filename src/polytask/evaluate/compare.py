"""Comparing runs: the multi-task gain Δm% over single-task baselines, and tables of metrics
over seeds.

Δm% (Maninis, Radosavovic & Kokkinos, "Attentive Single-Tasking of Multiple Tasks", CVPR 2019)
is the average relative difference of every metric of the multi-task model M_m against the
single-task baseline M_b, signed so that a gain is positive:

    Δm% = 100 / N · Σ_i (-1)^{l_i} (M_m,i − M_b,i) / M_b,i

over all N metrics of all tasks, with l_i = 1 where lower is better.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from polytask.tasks import TaskSpec


def relative_gains(
    multi: Mapping[str, Mapping[str, float]],
    single: Mapping[str, Mapping[str, float]],
    tasks: Sequence[TaskSpec],
) -> dict[str, dict[str, float]]:
    """Per task and metric, the signed relative gain in % of ``multi`` over ``single``
    (positive = better). Metrics whose baseline is 0 or NaN are left out."""
    gains: dict[str, dict[str, float]] = {}
    for task in tasks:
        for metric in task.metric_names:
            m = multi.get(task.name, {}).get(metric, math.nan)
            b = single.get(task.name, {}).get(metric, math.nan)
            if math.isnan(m) or math.isnan(b) or b == 0:
                continue
            sign = 1.0 if task.higher_is_better(metric) else -1.0
            gains.setdefault(task.name, {})[metric] = 100.0 * sign * (m - b) / abs(b)
    return gains


def delta_m(
    multi: Mapping[str, Mapping[str, float]],
    single: Mapping[str, Mapping[str, float]],
    tasks: Sequence[TaskSpec],
) -> float:
    """Δm% of ``multi`` over ``single``: the mean of every metric's relative gain.

    Example (accuracy 0.9 vs 0.8 is +12.5 %, RMSE 1.0 vs 2.0 is +50 %):
        >>> tasks = [TaskSpec("c", "multiclass", num_classes=3, metrics=("accuracy",)),
        ...          TaskSpec("r", "regression", metrics=("rmse",))]
        >>> delta_m({"c": {"accuracy": 0.9}, "r": {"rmse": 1.0}},
        ...         {"c": {"accuracy": 0.8}, "r": {"rmse": 2.0}}, tasks)
        31.25
    """
    values = [
        g for per_task in relative_gains(multi, single, tasks).values() for g in per_task.values()
    ]
    return sum(values) / len(values) if values else math.nan


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """(mean, sample standard deviation) of ``values``, NaN values left out; ``(nan, nan)`` when
    none is left and a std of 0 for a single value.

    >>> mean_std([1.0, 3.0, float("nan")])
    (2.0, 1.4142135623730951)
    """
    kept = [float(v) for v in values if v is not None and not math.isnan(v)]
    if not kept:
        return math.nan, math.nan
    mean = sum(kept) / len(kept)
    if len(kept) == 1:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in kept) / (len(kept) - 1))


def summarize_groups(
    groups: Mapping[str, Sequence[Mapping[str, Mapping[str, float]]]],
) -> dict[str, dict[str, dict[str, tuple[float, float, int]]]]:
    """Per group label, task and metric: (mean, sample std, number of runs) over the group's
    runs (e.g. the seeds of one setting). NaN values are left out."""
    summary: dict[str, dict[str, dict[str, tuple[float, float, int]]]] = {}
    for label, runs in groups.items():
        values: dict[tuple[str, str], list[float]] = {}
        for metrics in runs:
            for task, per_task in metrics.items():
                for metric, value in per_task.items():
                    if value is not None and not math.isnan(value):
                        values.setdefault((task, metric), []).append(float(value))
        for (task, metric), xs in values.items():
            mean, std = mean_std(xs)
            summary.setdefault(label, {}).setdefault(task, {})[metric] = (mean, std, len(xs))
    return summary


def comparison_markdown(
    summary: Mapping[str, Mapping[str, Mapping[str, tuple[float, float, int]]]],
    *,
    metrics: Sequence[str] | None = None,
    digits: int = 4,
) -> str:
    """A Markdown table: one row per (task, metric), one column per group, ``mean ± std``.

    Example:
        >>> s = summarize_groups({"a": [{"t": {"acc": 0.5}}, {"t": {"acc": 0.7}}]})
        >>> print(comparison_markdown(s, digits=2))
        | task | metric | a |
        |---|---|---|
        | t | acc | 0.60 ± 0.14 (n=2) |
    """
    labels = list(summary)
    rows: list[tuple[str, str]] = []
    for label in labels:
        for task, per_task in summary[label].items():
            for metric in per_task:
                if metric == "loss" or (metrics is not None and metric not in metrics):
                    continue
                if (task, metric) not in rows:
                    rows.append((task, metric))
    lines = ["| task | metric | " + " | ".join(labels) + " |", "|---" * (len(labels) + 2) + "|"]
    for task, metric in rows:
        cells = []
        for label in labels:
            stat = summary[label].get(task, {}).get(metric)
            if stat is None:
                cells.append("—")
            else:
                mean, std, n = stat
                cells.append(f"{mean:.{digits}f} ± {std:.{digits}f} (n={n})")
        lines.append(f"| {task} | {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
