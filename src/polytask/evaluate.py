"""Per-task evaluation and the multi-task gain Δm% over single-task baselines.

Δm% (Maninis, Radosavovic & Kokkinos, "Attentive Single-Tasking of Multiple Tasks", CVPR 2019)
is the average relative difference of every metric of the multi-task model M_m against the
single-task baseline M_b, signed so that a gain is positive:

    Δm% = 100 / N · Σ_i (-1)^{l_i} (M_m,i − M_b,i) / M_b,i

over all N metrics of all tasks, with l_i = 1 where lower is better.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor

from polytask.balancing.reduce import Reducer
from polytask.data.preprocess import Inputs, inputs_to
from polytask.models import MultiTaskModel
from polytask.tasks import TaskSpec, compute_metrics

Batch = tuple[Inputs, dict[str, Tensor]]
TaskMetrics = dict[str, dict[str, float]]


@torch.no_grad()
def evaluate(
    model: MultiTaskModel,
    batches: Iterable[Batch],
    tasks: Sequence[TaskSpec],
    *,
    device: torch.device | str = "cpu",
    reducer: Reducer | None = None,
) -> TaskMetrics:
    """Each task's metrics (and mean ``loss`` over labelled samples) on ``batches``.

    Under data parallelism each process passes its shard and a ``reducer``: loss sums are added
    over processes and torchmetrics gathers the metric states, so every process gets the
    metrics of the whole split."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    collections = {t.name: t.make_metrics().to(device) for t in tasks}
    loss_sum = torch.zeros(len(tasks), dtype=torch.float64, device=device)
    count_sum = torch.zeros(len(tasks), dtype=torch.float64, device=device)
    for inputs, y in batches:
        outputs = model(inputs_to(inputs, device)).outputs
        for i, task in enumerate(tasks):
            target = y[task.name].to(device, non_blocking=True)
            loss, count = task.compute_loss(outputs[task.name], target)
            loss_sum[i] += loss.double() * count
            count_sum[i] += count
            task.update_metrics(collections[task.name], outputs[task.name], target)
    model.train(was_training)
    if reducer is not None:
        loss_sum, count_sum = reducer.sum(loss_sum), reducer.sum(count_sum)
    losses = (loss_sum / count_sum.clamp_min(1)).tolist()
    counts = count_sum.tolist()
    result: TaskMetrics = {}
    for i, task in enumerate(tasks):
        metrics = compute_metrics(collections[task.name])
        metrics["loss"] = losses[i] if counts[i] > 0 else math.nan
        result[task.name] = metrics
    return result


def monitor_value(metrics: TaskMetrics, tasks: Sequence[TaskSpec], name: str) -> float:
    """The early-stopping quantity: ``loss`` (mean of the tasks' losses) or ``task/metric``."""
    if name == "loss":
        values = [metrics[t.name]["loss"] for t in tasks if not math.isnan(metrics[t.name]["loss"])]
        return sum(values) / len(values) if values else math.nan
    task_name, _, metric = name.partition("/")
    return metrics[task_name][metric]


def monitor_higher_is_better(tasks: Sequence[TaskSpec], name: str) -> bool:
    """Whether a larger value of the monitored quantity ``name`` is better."""
    if name == "loss":
        return False
    task_name, _, metric = name.partition("/")
    task = next(t for t in tasks if t.name == task_name)
    return task.higher_is_better(metric)


def monitor_problem(tasks: Sequence[TaskSpec], name: str) -> str | None:
    """Why ``name`` cannot be monitored for these tasks, or ``None`` if it can."""
    if name == "loss":
        return None
    task_name, sep, metric = name.partition("/")
    by_name = {t.name: t for t in tasks}
    if not sep or task_name not in by_name:
        choices = ", ".join(f"{t.name}/<metric>" for t in tasks)
        return f"expected 'loss' or one of {choices}, found {name!r}"
    valid = [*by_name[task_name].metric_names, "loss"]
    if metric not in valid:
        return f"task {task_name!r} has no metric {metric!r}; valid: {', '.join(valid)}"
    return None


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
            mean = sum(xs) / len(xs)
            std = (
                math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
            )
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
