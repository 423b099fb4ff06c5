"""What a study leaves in its output folder.

- ``trials.csv`` and ``trials.md``: one row per trial (state, objective values, every task's
  primary validation metric, test Δm%, sampled parameters, run folder);
- ``pareto.png``: every pair of tasks' primary validation metrics, one point per complete trial,
  the non-dominated trials (over all tasks) highlighted;
- ``importances.md``: Optuna's parameter importances (fANOVA), per objective;
- ``report.html``: all of the above on one self-contained page (``polytask.tune.report``);
- ``best.yaml`` (Δm%): the best trial's configuration, ready for ``polytask train``; with the
  Pareto objective, ``front/trial-NNNN.yaml`` for every trial on the front instead.
"""

from __future__ import annotations

import csv
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from polytask.config import config_to_dict, parse_config
from polytask.io import atomic_path, write_text_atomic
from polytask.tune.objectives import pareto_front
from polytask.tune.report import study_report
from polytask.tune.space import apply_values
from polytask.tune.study import StudyResult

__all__ = [
    "TuneOutputs",
    "front_trials",
    "importances",
    "trial_rows",
    "trials_markdown",
    "write_outputs",
]


@dataclass
class TuneOutputs:
    """The files ``write_outputs`` wrote."""

    table_csv: Path
    table_markdown: Path
    importances: Path
    configs: list[Path] = field(default_factory=list)
    plot: Path | None = None
    report: Path | None = None


def _complete(study: Any) -> list[Any]:
    import optuna

    return list(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))


def _val_points(result: StudyResult, trials: Sequence[Any]) -> list[list[float]]:
    """Every task's primary validation metric of each trial (NaN where missing)."""
    columns = result.runner.objective.columns()
    points = []
    for trial in trials:
        val = trial.user_attrs.get("val") or {}
        points.append([_number((val.get(task) or {}).get(metric)) for task, metric in columns])
    return points


def _number(value: Any) -> float:
    return math.nan if value is None else float(value)


def front_trials(result: StudyResult) -> list[Any]:
    """The complete trials whose validation metrics no other trial dominates (over every
    task's primary metric; for the Pareto objective these are Optuna's ``best_trials``)."""
    trials = _complete(result.study)
    objective = result.runner.objective
    directions = [
        "maximize" if t.higher_is_better(m) else "minimize"
        for t, (_, m) in zip(objective.tasks, objective.columns(), strict=True)
    ]
    return [trials[i] for i in pareto_front(_val_points(result, trials), directions)]


def trial_rows(result: StudyResult) -> list[dict[str, Any]]:
    """One mapping per trial, in trial order (the columns of ``trials.csv``)."""
    objective = result.runner.objective
    fields = result.runner.space.fields()
    rows = []
    for trial in result.study.get_trials(deepcopy=False):
        values = trial.values or [math.nan] * len(objective.labels())
        row: dict[str, Any] = {"trial": trial.number, "state": trial.state.name}
        row.update(zip(objective.labels(), values, strict=True))
        if not objective.multi:
            val = trial.user_attrs.get("val") or {}
            for task, metric in objective.columns():
                row[f"val {task} {metric}"] = _number((val.get(task) or {}).get(metric))
            row["test Δm%"] = _number(trial.user_attrs.get("test_delta_m"))
        stored = result.runner.space.values_of(trial.params)
        row.update({name: stored.get(name, "") for name in fields})
        row["best epoch"] = trial.user_attrs.get(
            "best_epoch", trial.user_attrs.get("pruned_at_epoch", "")
        )
        row["run folder"] = trial.user_attrs.get("run_dir", "")
        rows.append(row)
    return rows


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "—" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def trials_markdown(rows: Sequence[dict[str, Any]], *, short: bool = False) -> str:
    """``rows`` as a Markdown table (``short``: without the run folder column)."""
    if not rows:
        return "(no trials)"
    columns = [c for c in rows[0] if not (short and c == "run folder")]
    lines = ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def importances(result: StudyResult) -> dict[str, dict[str, float]] | str:
    """Per objective, each parameter's fANOVA importance (summing to 1); or why none could be
    computed (fewer than two complete trials, or no parameter that varied)."""
    import optuna

    study = result.study
    complete = _complete(study)
    if len(complete) < 2:
        return f"needs at least 2 complete trials; the study has {len(complete)}"
    found: dict[str, dict[str, float]] = {}
    for index, label in enumerate(result.runner.objective.labels()):
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
        target = (lambda t, i=index: t.values[i]) if result.runner.objective.multi else None
        try:
            found[label] = optuna.importance.get_param_importances(
                study, evaluator=evaluator, target=target
            )
        except (ValueError, RuntimeError) as exc:
            return f"could not be computed: {exc}"
    if not any(found.values()):
        return "no parameter varied over the complete trials"
    return found


def _importances_markdown(found: dict[str, dict[str, float]] | str, name: str) -> str:
    title = f"# {name}: parameter importances (fANOVA)\n\n"
    if isinstance(found, str):
        return title + f"Not available: {found}.\n"
    parts = []
    for label, values in found.items():
        lines = [f"## {label}\n", "| parameter | importance |", "|---|---|"]
        lines += [f"| {p} | {v:.3f} |" for p, v in values.items()]
        parts.append("\n".join(lines))
    return title + "\n\n".join(parts) + "\n"


def trial_config_yaml(result: StudyResult, trial: Any, name: str) -> str:
    """Trial ``trial``'s configuration as YAML for ``polytask train`` (named ``name``, writing
    under the base configuration's ``output_dir``)."""
    base = result.runner.base
    raw = apply_values({**base, "name": name}, result.runner.space.values_of(trial.params))
    config = parse_config(raw, source=f"trial {trial.number}")
    scores = ", ".join(
        f"{label} = {value:.4g}"
        for label, value in zip(result.runner.objective.labels(), trial.values, strict=True)
    )
    header = (
        f"# polytask tune: study {result.settings.name}, trial {trial.number} ({scores});\n"
        f"# its run folder: {trial.user_attrs.get('run_dir', '?')}\n"
    )
    return header + yaml.safe_dump(config_to_dict(config), sort_keys=False)


def write_outputs(result: StudyResult) -> TuneOutputs:
    """Write the table, plot, importances and ready configurations into the output folder."""
    output = result.settings.output
    output.mkdir(parents=True, exist_ok=True)
    rows = trial_rows(result)
    outputs = TuneOutputs(output / "trials.csv", output / "trials.md", output / "importances.md")
    with atomic_path(outputs.table_csv) as temporary, temporary.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["trial"])
        writer.writeheader()
        writer.writerows(rows)
    title = f"# study {result.settings.name}: {len(rows)} trials\n\n"
    write_text_atomic(outputs.table_markdown, title + trials_markdown(rows) + "\n")
    found = importances(result)
    write_text_atomic(outputs.importances, _importances_markdown(found, result.settings.name))
    outputs.configs = _write_configs(result, output)
    if len(result.runner.objective.tasks) > 1 and _complete(result.study):
        outputs.plot = output / "pareto.png"
        plot_front(result, outputs.plot)
    outputs.report = study_report(
        output / "report.html",
        name=result.settings.name,
        rows=rows,
        front=[t.number for t in front_trials(result)],
        importances=found,
        plot=outputs.plot,
        configs=outputs.configs,
    )
    return outputs


def _write_configs(result: StudyResult, output: Path) -> list[Path]:
    base_name = result.runner.base["name"]
    if not _complete(result.study):
        return []
    if not result.runner.objective.multi:
        path = output / "best.yaml"
        best = result.study.best_trial
        write_text_atomic(path, trial_config_yaml(result, best, f"{base_name}-tuned"))
        return [path]
    (output / "front").mkdir(exist_ok=True)
    paths = []
    for trial in result.study.best_trials:
        path = output / "front" / f"trial-{trial.number:04d}.yaml"
        name = f"{base_name}-trial-{trial.number:04d}"
        write_text_atomic(path, trial_config_yaml(result, trial, name))
        paths.append(path)
    return paths


def plot_front(result: StudyResult, path: Path) -> None:
    """Every pair of tasks' primary validation metrics, one point per complete trial, the
    non-dominated trials highlighted (and joined in the order of the first task)."""
    from matplotlib.figure import Figure

    trials = _complete(result.study)
    points = _val_points(result, trials)
    front = {t.number for t in front_trials(result)}
    labels = [f"{task} {metric}" for task, metric in result.runner.objective.columns()]
    pairs = list(itertools.combinations(range(len(labels)), 2))
    columns = min(3, len(pairs))
    rows = -(-len(pairs) // columns)
    figure = Figure(figsize=(4.2 * columns, 3.6 * rows))
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for ax, (a, b) in zip(axes, pairs, strict=False):
        ax.scatter(
            [p[a] for p in points], [p[b] for p in points], s=18, color="#9aa5b1", label="trial"
        )
        chosen = sorted(
            (points[i][a], points[i][b]) for i, t in enumerate(trials) if t.number in front
        )
        ax.plot(
            [x for x, _ in chosen],
            [y for _, y in chosen],
            "o-",
            color="#d62728",
            markersize=5,
            linewidth=1,
            label="Pareto front",
        )
        ax.set_xlabel(f"val {labels[a]}")
        ax.set_ylabel(f"val {labels[b]}")
        ax.legend(fontsize=7)
    for ax in axes[len(pairs) :]:
        ax.set_visible(False)
    figure.suptitle(f"study {result.settings.name}: {len(trials)} complete trials")
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=110)
