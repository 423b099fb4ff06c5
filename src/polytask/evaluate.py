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

from polytask.models import MultiTaskModel
from polytask.tasks import TaskSpec, compute_metrics

Batch = tuple[Tensor, dict[str, Tensor]]
TaskMetrics = dict[str, dict[str, float]]


@torch.no_grad()
def evaluate(
    model: MultiTaskModel,
    batches: Iterable[Batch],
    tasks: Sequence[TaskSpec],
    *,
    device: torch.device | str = "cpu",
) -> TaskMetrics:
    """Each task's metrics (and mean ``loss`` over labelled samples) on ``batches``."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    collections = {t.name: t.make_metrics().to(device) for t in tasks}
    loss_sum = torch.zeros(len(tasks), dtype=torch.float64, device=device)
    count_sum = torch.zeros(len(tasks), dtype=torch.float64, device=device)
    for x, y in batches:
        x = x.to(device, non_blocking=True)
        outputs = model(x).outputs
        for i, task in enumerate(tasks):
            target = y[task.name].to(device, non_blocking=True)
            loss, count = task.compute_loss(outputs[task.name], target)
            loss_sum[i] += loss.double() * count
            count_sum[i] += count
            task.update_metrics(collections[task.name], outputs[task.name], target)
    model.train(was_training)
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
