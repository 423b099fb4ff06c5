"""Experiments: several runs of one configuration, compared.

- ``train_with_baselines``: the run a configuration describes and, when ``evaluate.baselines``
  asks, one single-task run per task (trained once and cached in ``baselines/<task>/``) and Δm%.
- ``compare_methods``: the configuration trained with each balancing method over several seeds,
  against single-task baselines trained once, summarised as mean ± std and ranked by Δm%.

Experiments call ``polytask.run.single.train_run``; a single run never calls back up here.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from polytask.config import BalancingConfig, EvaluateConfig, RunConfig, config_to_dict
from polytask.dense_tasks import DENSE_KINDS
from polytask.evaluate import TaskMetrics, delta_m, mean_std
from polytask.io import atomic_path, write_text_atomic
from polytask.run.folder import RunFolder
from polytask.run.single import RunResult, evaluate_run, resume_run, train_run
from polytask.runtime import is_main_process
from polytask.tasks import TaskSpec


# ----------------------------------------------------------------------------- baselines
def subset_config(config: RunConfig, tasks: Sequence[str], *, name: str) -> RunConfig:
    """``config`` restricted to ``tasks`` (``data.tasks``, with their task weights and class
    balance; early stopping on ``loss`` when it monitored another task), named ``name``."""
    data = config.data.model_copy(
        update={
            "tasks": list(tasks),
            "task_weights": {k: v for k, v in config.data.task_weights.items() if k in tasks},
            "class_balance": {k: v for k, v in config.data.class_balance.items() if k in tasks},
        }
    )
    train = config.train
    metric = train.early_stopping.metric
    if metric != "loss" and metric.partition("/")[0] not in tasks:
        stopping = train.early_stopping.model_copy(update={"metric": "loss"})
        train = train.model_copy(update={"early_stopping": stopping})
    return config.model_copy(update={"name": name, "data": data, "train": train})


def baseline_config(config: RunConfig, task: str) -> RunConfig:
    """The single-task configuration of ``task``: the same data, model and optimisation with only
    that task (balancing is moot with one task: equal weighting)."""
    return subset_config(config, [task], name=task).model_copy(
        update={
            "balancing": BalancingConfig(method="equal"),
            "evaluate": EvaluateConfig(baselines=False),
        }
    )


def _fingerprint(config: RunConfig) -> str:
    """What a cached baseline was trained with (everything but its name, folder and display)."""
    raw = config_to_dict(config)
    for key in ("name", "output_dir"):
        raw.pop(key)
    raw["train"].pop("progress", None)
    return hashlib.sha256(json.dumps(raw, sort_keys=True).encode()).hexdigest()[:16]


def train_baselines(
    config: RunConfig, folder: RunFolder, tasks: Sequence[TaskSpec], *, progress: bool | None = None
) -> TaskMetrics:
    """Each task's test metrics from a single-task model, trained once and cached in
    ``folder/baselines/<task>/`` (retrained when its configuration changed)."""
    results: TaskMetrics = {}
    for task in tasks:
        single = baseline_config(config, task.name)
        baseline = folder.baseline(task.name)
        fingerprint = _fingerprint(single)
        if baseline.results_path.is_file():
            cached = baseline.read_results()
            if cached.get("fingerprint") == fingerprint:
                results[task.name] = cached["test"][task.name]
                continue
        outcome = train_run(
            single, run_dir=baseline.path, progress=progress, description=f"single-task {task.name}"
        )
        results[task.name] = outcome.test[task.name]
        if is_main_process():  # rank 0 alone writes the cache
            baseline.write_results({**outcome.to_json(), "fingerprint": fingerprint})
    return results


def _with_baselines(
    result: RunResult, config: RunConfig, *, progress: bool | None = None
) -> RunResult:
    result.baselines = train_baselines(
        config, RunFolder(result.run_dir), result.tasks, progress=progress
    )
    result.delta_m = delta_m(result.test, result.baselines, result.tasks)
    return result


def train_with_baselines(
    config: RunConfig, *, baselines: bool | None = None, progress: bool | None = None
) -> RunResult:
    """Train the run ``config`` describes; with ``evaluate.baselines`` (or ``baselines=True``),
    also the single-task baselines, and save Δm% in ``results.json``."""
    result = train_run(config, progress=progress)
    return _finish(result, config, baselines=baselines, progress=progress)


def resume_with_baselines(run_dir: Path, *, progress: bool | None = None) -> RunResult:
    """Resume the run in ``run_dir``, then its baselines if its configuration asks for them."""
    result = resume_run(run_dir, progress=progress)
    return _finish(result, RunFolder(run_dir).read_config(), baselines=None, progress=progress)


def _finish(
    result: RunResult, config: RunConfig, *, baselines: bool | None, progress: bool | None
) -> RunResult:
    if not (config.evaluate.baselines if baselines is None else baselines):
        return result
    _with_baselines(result, config, progress=progress)
    if is_main_process():
        RunFolder(result.run_dir).write_results(result.to_json())
    return result


def evaluate_with_baselines(run_dir: Path, *, baselines: bool = False) -> RunResult:
    """Re-evaluate a run folder's best model on its test split, with Δm% when baselines are
    asked for, configured or already cached."""
    result = evaluate_run(run_dir)
    config = RunFolder(run_dir).read_config()
    if baselines or config.evaluate.baselines or (result.run_dir / "baselines").is_dir():
        _with_baselines(result, config)
    return result


# ----------------------------------------------------------------------------- methods x seeds
@dataclass
class MethodRow:
    """One method's results over seeds."""

    method: str
    runs: list[TaskMetrics] = field(default_factory=list)
    deltas: list[float] = field(default_factory=list)
    run_dirs: list[Path] = field(default_factory=list)  # one per seed, in the seeds' order

    def stat(self, task: str, metric: str) -> tuple[float, float]:
        return mean_std([r[task][metric] for r in self.runs])

    @property
    def delta(self) -> tuple[float, float]:
        return mean_std(self.deltas)


@dataclass
class Comparison:
    """Methods compared on one configuration."""

    name: str
    tasks: list[TaskSpec]
    baselines: TaskMetrics
    rows: list[MethodRow]
    seeds: list[int]

    def columns(self) -> list[tuple[str, str]]:
        """(task, metric) pairs shown: each task's first (primary) metric, and every metric of
        a dense task (the NYUv2 tables of MTAN/LibMTL list them all; Δm% averages them all)."""
        return [
            (t.name, metric)
            for t in self.tasks
            for metric in (t.metric_names if t.kind in DENSE_KINDS else t.metric_names[:1])
        ]


def method_config(config: RunConfig, method: str, seed: int, folder: Path) -> RunConfig:
    """``config`` with ``balancing.method`` set to ``method`` (its own parameters kept when it is
    the configured method, defaults otherwise) and ``seed``, writing under ``folder``."""
    params = dict(config.balancing.params) if method == config.balancing.method else {}
    return config.model_copy(
        update={
            "name": f"{method}-seed{seed}",
            "seed": seed,
            "output_dir": str(folder),
            "balancing": config.balancing.model_copy(update={"method": method, "params": params}),
            "evaluate": config.evaluate.model_copy(update={"baselines": False}),
        }
    )


def compare_methods(
    config: RunConfig,
    methods: Sequence[str],
    *,
    seeds: int = 3,
    output_dir: Path,
    progress: bool = False,
) -> Comparison:
    """Train ``config`` with each method and seed, and the single-task baselines once."""
    folder = output_dir / f"compare-{config.name}"
    tasks: list[TaskSpec] = []
    rows = []
    seed_list = [config.seed + i for i in range(seeds)]
    for method in methods:
        row = MethodRow(method)
        for seed in seed_list:
            run_config = method_config(config, method, seed, folder)
            result = train_run(
                run_config,
                run_dir=folder / run_config.name,
                progress=progress,
                description=f"{method} seed {seed}",
            )
            tasks = result.tasks
            row.runs.append(result.test)
            row.run_dirs.append(result.run_dir)
        rows.append(row)
    baselines = train_baselines(config, RunFolder(folder), tasks, progress=progress)
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
        title = f"# {comparison.name}: balancing methods (mean ± std over seeds {seeds})\n\n"
        write_text_atomic(markdown, title + comparison_table(comparison) + "\n")
    if csv_path is not None:
        csv_path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(csv_path) as temporary, temporary.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["method", "seed", "task", "metric", "value", "delta_m"])
            for row in comparison.rows:
                for seed, run, delta in zip(comparison.seeds, row.runs, row.deltas, strict=True):
                    for task, metrics in run.items():
                        for metric, value in metrics.items():
                            writer.writerow([row.method, seed, task, metric, value, delta])
    if plot is not None:
        _plot_comparison(comparison, plot)


def _plot_comparison(comparison: Comparison, path: Path) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(max(4.0, 0.7 * len(comparison.rows) + 2), 3.2))
    draw_comparison(comparison, figure.subplots())
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=120)


def draw_comparison(comparison: Comparison, ax: Any) -> None:
    """The bar chart of each method's Δm% (mean ± std over seeds) on matplotlib axes ``ax``."""
    figure = ax.figure
    names = [r.method for r in comparison.rows]
    means = [r.delta[0] for r in comparison.rows]
    stds = [r.delta[1] for r in comparison.rows]
    ax.bar(names, means, yerr=stds, capsize=3, color="#4C72B0")
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_ylabel("Δm% vs single-task")
    ax.set_title(f"{comparison.name}: mean ± std over {len(comparison.seeds)} seeds")
    ax.tick_params(axis="x", rotation=45)
    figure.tight_layout()
