"""Per-task metrics of a split (each task's own metrics, ``TaskSpec.make_metrics``, and its mean
loss over labelled samples), and the quantity early stopping monitors."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch

from polytask.balancing.reduce import Reducer
from polytask.data.batches import Batch
from polytask.evaluate.inference import inference
from polytask.models import MultiTaskModel
from polytask.tasks import TaskSpec, compute_metrics

#: per task, per metric name, a value
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
    """Each task's metrics (and mean ``loss`` over labelled samples) on ``batches``; NaN for a
    task with no labelled sample there (``null`` in ``results.json``, "no labels" in tables).

    Under data parallelism each process passes its shard and a ``reducer``: loss sums are added
    over processes and torchmetrics gathers the metric states, so every process gets the
    metrics of the whole split."""
    device = torch.device(device)
    collections = {t.name: t.make_metrics().to(device) for t in tasks}
    loss_sum = torch.zeros(len(tasks), dtype=torch.float64, device=device)
    count_sum = torch.zeros(len(tasks), dtype=torch.float64, device=device)
    for outputs, y in inference(model, batches, device=device):
        for i, task in enumerate(tasks):
            target = y[task.name].to(device, non_blocking=True)
            loss, count = task.compute_loss(outputs[task.name], target)
            loss_sum[i] += loss.double() * count
            count_sum[i] += count
            task.update_metrics(collections[task.name], outputs[task.name], target)
    if reducer is not None:
        loss_sum, count_sum = reducer.sum(loss_sum), reducer.sum(count_sum)
    losses = (loss_sum / count_sum.clamp_min(1)).tolist()
    counts = count_sum.tolist()
    result: TaskMetrics = {}
    for i, task in enumerate(tasks):
        if counts[i] > 0:  # the counts are global: every process computes (and syncs) alike
            metrics = compute_metrics(collections[task.name])
            metrics["loss"] = losses[i]
        else:  # no labelled sample: no metric (an empty torchmetrics state gives 0.0, or fails)
            metrics = {str(name): math.nan for name in [*collections[task.name].keys(), "loss"]}
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
