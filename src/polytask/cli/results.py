"""The per-task results table printed after training and evaluation."""

from __future__ import annotations

import math

from rich.table import Table

from polytask.cli.app import out
from polytask.evaluate import relative_gains
from polytask.run import RunResult


def _fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.4f}"


def _no_labels(metrics: dict[str, float] | None) -> bool:
    """Whether a task's metrics say it had no labelled sample in the split: every value NaN,
    its loss included (``evaluate`` gives NaN rather than the 0.0 of an empty metric)."""
    return bool(metrics) and all(
        isinstance(v, float) and math.isnan(v) for v in (metrics or {}).values()
    )


def print_results(result: RunResult) -> None:
    """The per-task test table, with single-task baselines and Δm% when present."""
    table = Table(title=f"test metrics — {result.run_dir}")
    table.add_column("task")
    table.add_column("metric")
    table.add_column("multi-task", justify="right")
    gains: dict[str, dict[str, float]] = {}
    if result.baselines is not None:
        table.add_column("single-task", justify="right")
        table.add_column("gain %", justify="right")
        gains = relative_gains(result.test, result.baselines, result.tasks)
    for task in result.tasks:
        if _no_labels(result.test[task.name]):
            row = [task.name, "—", "no labels"]
            if result.baselines is not None:
                base = result.baselines.get(task.name)
                row += ["no labels" if _no_labels(base) else "—", "—"]
            table.add_row(*row)
            table.add_section()
            continue
        extra = [m for m in result.test[task.name] if m not in task.metric_names and m != "loss"]
        for i, metric in enumerate([*task.metric_names, *extra]):
            row = [task.name if i == 0 else "", metric, _fmt(result.test[task.name].get(metric))]
            if result.baselines is not None:
                row.append(_fmt(result.baselines.get(task.name, {}).get(metric)))
                gain = gains.get(task.name, {}).get(metric)
                row.append("—" if gain is None else f"{gain:+.2f}")
            table.add_row(*row)
        table.add_section()
    out.print(table)
    if result.delta_m is not None:
        out.print(
            f"[bold]Δm% = {result.delta_m:+.2f}[/] (mean relative gain of every metric over the "
            "single-task baselines; positive = multi-task is better)"
        )
