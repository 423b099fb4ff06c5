"""Compare balancing methods on one configuration: every method over several seeds, against
single-task baselines trained once, as tables (Markdown, CSV) and a plot.

``compare_methods`` trains ``config`` once per (method, seed) with ``balancing.method`` set,
trains the single-task baselines once (seed of the configuration), and summarises each task's
metrics and Δm% as mean ± std over seeds, sorted by Δm% (best first).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from polytask.config import RunConfig, config_to_dict, parse_config
from polytask.evaluate import TaskMetrics, delta_m
from polytask.recipe import train_baselines, train_from_config
from polytask.tasks import TaskSpec


@dataclass
class MethodRow:
    """One method's results over seeds."""

    method: str
    runs: list[TaskMetrics] = field(default_factory=list)
    deltas: list[float] = field(default_factory=list)

    def stat(self, task: str, metric: str) -> tuple[float, float]:
        values = [r[task][metric] for r in self.runs if not math.isnan(r[task][metric])]
        return _mean_std(values)

    @property
    def delta(self) -> tuple[float, float]:
        return _mean_std([d for d in self.deltas if not math.isnan(d)])


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


@dataclass
class Comparison:
    """Methods compared on one configuration."""

    name: str
    tasks: list[TaskSpec]
    baselines: TaskMetrics
    rows: list[MethodRow]
    seeds: list[int]

    def columns(self) -> list[tuple[str, str]]:
        """(task, metric) pairs shown: each task's first (primary) metric."""
        return [(t.name, t.metric_names[0]) for t in self.tasks]


def compare_methods(
    config: RunConfig,
    methods: Sequence[str],
    *,
    seeds: int = 3,
    output_dir: Path,
    progress: bool = False,
) -> Comparison:
    """Train ``config`` with each method and seed, and the single-task baselines once."""
    base = config_to_dict(config)
    base["evaluate"]["baselines"] = False
    folder = output_dir / f"compare-{config.name}"
    tasks: list[TaskSpec] = []
    rows = []
    seed_list = [config.seed + i for i in range(seeds)]
    for method in methods:
        row = MethodRow(method)
        for seed in seed_list:
            raw = {**base, "name": f"{method}-seed{seed}", "seed": seed, "output_dir": str(folder)}
            same = method == config.balancing.method  # keep its parameters; others: defaults
            params = dict(config.balancing.params) if same else {}
            raw["balancing"] = {**base["balancing"], "method": method, "params": params}
            run_config = parse_config(raw, source=f"{config.name} with {method}, seed {seed}")
            result = train_from_config(
                run_config,
                run_dir=folder / run_config.name,
                progress=progress,
                description=f"{method} seed {seed}",
                baselines=False,
            )
            tasks = result.tasks
            row.runs.append(result.test)
        rows.append(row)
    baselines = train_baselines(config, folder, tasks, progress=progress)
    for row in rows:
        row.deltas = [delta_m(run, baselines, tasks) for run in row.runs]
    rows.sort(key=lambda r: -r.delta[0] if not math.isnan(r.delta[0]) else math.inf)
    return Comparison(config.name, tasks, baselines, rows, seed_list)


def _fmt(mean: float, std: float, digits: int = 4) -> str:
    if math.isnan(mean):
        return "—"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def comparison_table(comparison: Comparison) -> str:
    """The Markdown table: one row per method (best Δm% first), then the baselines."""
    cols = comparison.columns()
    header = "| method | " + " | ".join(f"{t} {m}" for t, m in cols) + " | Δm% |"
    lines = [header, "|---" * (len(cols) + 2) + "|"]
    for row in comparison.rows:
        cells = [_fmt(*row.stat(t, m)) for t, m in cols]
        lines.append(f"| {row.method} | " + " | ".join(cells) + f" | {_fmt(*row.delta, 2)} |")
    singles = [f"{comparison.baselines[t][m]:.4f}" for t, m in cols]
    lines.append("| single-task | " + " | ".join(singles) + " | 0 |")
    return "\n".join(lines)


def write_comparison(
    comparison: Comparison, *, markdown: Path | None, csv_path: Path | None, plot: Path | None
) -> None:
    """Save the table as Markdown and CSV and a bar chart of Δm% (mean ± std)."""
    if markdown is not None:
        markdown.parent.mkdir(parents=True, exist_ok=True)
        seeds = ", ".join(map(str, comparison.seeds))
        text = (
            f"# {comparison.name}: balancing methods (mean ± std over seeds {seeds})\n\n"
            + comparison_table(comparison)
            + "\n"
        )
        markdown.write_text(text)
    if csv_path is not None:
        csv_path.parent.mkdir(parents=True, exist_ok=True)
        with csv_path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["method", "seed", "task", "metric", "value", "delta_m"])
            for row in comparison.rows:
                for seed, run, delta in zip(comparison.seeds, row.runs, row.deltas, strict=True):
                    for task, metrics in run.items():
                        for metric, value in metrics.items():
                            writer.writerow([row.method, seed, task, metric, value, delta])
    if plot is not None:
        from matplotlib.figure import Figure

        figure = Figure(figsize=(max(4.0, 0.7 * len(comparison.rows) + 2), 3.2))
        ax = figure.subplots()
        names = [r.method for r in comparison.rows]
        means = [r.delta[0] for r in comparison.rows]
        stds = [r.delta[1] for r in comparison.rows]
        ax.bar(names, means, yerr=stds, capsize=3, color="#4C72B0")
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_ylabel("Δm% vs single-task")
        ax.set_title(f"{comparison.name}: mean ± std over {len(comparison.seeds)} seeds")
        ax.tick_params(axis="x", rotation=45)
        figure.tight_layout()
        plot.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(plot, format="png", dpi=120)
