"""``polytask report``: one self-contained HTML page about a finished run, and the same style of
page for a comparison of balancing methods over seeds.

A run's page shows its configuration and data (samples and label coverage per task, class
balance), its training curves, the balancing weights over time, the gradient-cosine heatmap over
time (when ``balancing.diagnostics`` was on), gate usage (MMoE, CGC, PLE: the mean gate weight of
every expert over the test inputs, read by forward hooks on the gate modules), the test table
with single-task baselines and Δm%, and per task a confusion matrix (classification),
calibration (binary) or residuals (regression). Every figure is a base64 PNG inside the page:
it opens offline and loads nothing.
"""

from __future__ import annotations

import html
import math
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import Tensor, nn

from polytask.analysis.affinity import draw_matrix
from polytask.analysis.html import (
    figure_html,
    html_page,
    new_figure,
    note,
    png_html,
    section,
    table,
)
from polytask.data.bundle import DataBundle
from polytask.evaluate import inference, relative_gains
from polytask.io import write_text_atomic
from polytask.models.experts import GATES
from polytask.run.data import build_data, eval_batches
from polytask.run.experiments import Comparison, draw_comparison
from polytask.run.folder import RunFolder, TrainedModel
from polytask.runtime.device import resolve_device
from polytask.tasks import TaskSpec
from polytask.train.runlog import plot_curves, read_metrics

__all__ = [
    "RunEvidence",
    "collect_evidence",
    "comparison_report",
    "gate_usage",
    "run_report",
    "write_comparison_report",
    "write_run_report",
]

#: the sections of a run's page, in order (their ids are these titles' slugs)
SECTIONS = (
    "Configuration",
    "Data",
    "Training curves",
    "Balancing weights",
    "Gradient cosine",
    "Gate usage",
    "Test results",
    "Confusion matrices",
    "Calibration",
    "Residuals",
)


@dataclass
class RunEvidence:
    """What a run's report is drawn from: its files, its data and its test predictions."""

    folder: RunFolder
    trained: TrainedModel
    bundle: DataBundle
    records: list[dict[str, Any]]
    results: dict[str, Any]
    #: per task, (decoded predictions, targets) on the test split, on the CPU
    predictions: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)
    #: per gate module (its path in the model), the mean weight of each expert on the test split
    gates: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def tasks(self) -> list[TaskSpec]:
        """The run's tasks (with their fitted target scales)."""
        return self.trained.tasks


def _gate_classes() -> tuple[type, ...]:
    return tuple(GATES.get(n) for n in GATES.names() if isinstance(GATES.get(n), type))


def gate_usage(
    model: nn.Module, run: Any, classes: tuple[type, ...] | None = None
) -> dict[str, np.ndarray]:
    """Call ``run()`` with a forward hook on every gate module of ``model`` (the classes of the
    ``GATES`` registry) and return, per gate (its module path), the mean weight it gave each
    expert over all the rows it saw; empty for a model without gates."""
    classes = classes or _gate_classes()
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = {}

    def hook_for(name: str) -> Any:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            weights = (output[0] if isinstance(output, tuple) else output).detach()
            flat = weights.reshape(-1, weights.shape[-1]).double()
            sums[name] = sums.get(name, 0) + flat.sum(dim=0)
            counts[name] = counts.get(name, 0) + flat.shape[0]

        return hook

    gates = [name for name, m in model.named_modules() if isinstance(m, classes)]
    handles = [model.get_submodule(name).register_forward_hook(hook_for(name)) for name in gates]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return {name: (sums[name] / counts[name]).cpu().numpy() for name in sums}


def collect_evidence(run_dir: Path) -> RunEvidence:
    """Read a finished run folder: its metrics log, results, best model, data (checked against
    the run's fingerprint), test predictions and gate usage."""
    folder = RunFolder(run_dir)
    trained = folder.load_trained()
    results = folder.read_results()
    records = read_metrics(folder.path)
    bundle = build_data(trained.config)
    folder.check_data(bundle, "best")
    evidence = RunEvidence(folder, trained, bundle, records, results)
    outputs: dict[str, list[Tensor]] = {t.name: [] for t in trained.tasks}
    labels: dict[str, list[Tensor]] = {t.name: [] for t in trained.tasks}

    device = resolve_device(trained.config.train.device)
    trained.model.to(device)

    def predict() -> None:
        batches = eval_batches(trained.config, bundle, "test")
        for out, y in inference(trained.model, batches, device=device):
            for task in trained.tasks:
                outputs[task.name].append(task.decode(out[task.name]).cpu())
                labels[task.name].append(y[task.name].cpu())

    evidence.gates = gate_usage(trained.model, predict)
    for task in trained.tasks:
        if outputs[task.name]:
            evidence.predictions[task.name] = (
                torch.cat(outputs[task.name]),
                torch.cat(labels[task.name]),
            )
    return evidence


# ----------------------------------------------------------------------------- sections
def _config_section(evidence: RunEvidence) -> str:
    config = evidence.trained.config
    results = evidence.results
    summary = [
        ["name", config.name],
        ["run folder", str(evidence.folder.path)],
        ["dataset", evidence.bundle.info.get("source", "—")],
        ["architecture", config.model.architecture],
        ["encoder", config.model.encoder],
        ["balancing", config.balancing.method],
        ["optimizer", f"{config.optimizer.name} (lr {config.optimizer.lr:g})"],
        ["epochs run", results.get("epochs_run", "—")],
        ["best epoch", results.get("best_epoch", "—")],
        ["seed", config.seed],
    ]
    text = evidence.folder.config_path.read_text() if evidence.folder.config_path.is_file() else ""
    dump = text or yaml.safe_dump(evidence.trained.config.model_dump(), sort_keys=False)
    return section(
        "Configuration",
        table(["setting", "value"], summary),
        "<details><summary>config.yaml</summary><pre>" + html.escape(dump) + "</pre></details>",
    )


def _class_balance(task: TaskSpec, y: Tensor) -> str:
    """Share of each class among the labelled training rows (classification tasks)."""
    labelled = y[task.label_mask(y)]
    if task.kind == "multiclass":
        counts = torch.bincount(labelled.long(), minlength=task.num_classes).double()
    elif task.kind == "binary":
        counts = torch.stack([(labelled < 0.5).sum(), (labelled >= 0.5).sum()]).double()
    elif task.kind == "multilabel":
        rows = y.reshape(len(y), -1)
        mask = task.label_mask(rows)
        positive = torch.where(mask, rows, torch.zeros_like(rows)).sum(dim=0)
        share = positive / mask.sum(dim=0).clamp_min(1)
        return "positive share per label: " + ", ".join(f"{v:.2f}" for v in share.tolist()[:20])
    else:
        return "—"
    share = counts / counts.sum().clamp_min(1)
    return ", ".join(f"{c}: {s:.1%}" for c, s in enumerate(share.tolist()))


def _data_section(evidence: RunEvidence) -> str:
    bundle = evidence.bundle
    splits = {"train": bundle.train, "val": bundle.val, "test": bundle.test}
    rows = []
    for task in bundle.tasks:
        cells: list[Any] = [task.name, task.kind]
        if any(task.name not in data.targets for data in splits.values()):
            # a streamed dense split keeps its label maps on disk
            rows.append([*cells, *["streamed: not counted"] * (2 * len(splits) + 1)])
            continue
        for data in splits.values():
            y = data.targets[task.name]
            mask = task.label_mask(y).reshape(len(y), -1).all(dim=1) if len(y) else y.bool()
            labelled = int(mask.sum())
            cells += [labelled, f"{labelled / max(len(y), 1):.1%}"]
        cells.append(_class_balance(task, bundle.train.targets[task.name]))
        rows.append(cells)
    headers = ["task", "kind"]
    for split in splits:
        headers += [f"{split} labelled", f"{split} coverage"]
    sizes = ", ".join(f"{s} {len(d)}" for s, d in splits.items())
    return section(
        "Data",
        note(f"{bundle.info.get('source', 'data')}: {sizes} samples; coverage = labelled share."),
        table([*headers, "class balance (train)"], rows),
    )


def _curves_section(evidence: RunEvidence) -> str:
    if not evidence.records:
        return section("Training curves", note("metrics.jsonl holds no epoch."))
    with tempfile.TemporaryDirectory() as scratch:  # the run log's own plot of its curves
        path = Path(scratch) / "curves.png"
        plot_curves(evidence.records, path)
        image = png_html(path.read_bytes(), "training curves")
    return section("Training curves", image)


def _epoch_series(records: Sequence[Mapping[str, Any]], key: str) -> dict[str, list[tuple]]:
    """Per task, (epoch, value) pairs of ``record[key][task]`` where it is a finite number."""
    series: dict[str, list[tuple]] = {}
    for record in records:
        values = record.get(key)
        epoch = record.get("epoch")
        if not isinstance(values, Mapping) or not isinstance(epoch, (int, float)):
            continue
        for task, value in values.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                series.setdefault(str(task), []).append((epoch, float(value)))
    return series


def _weights_section(evidence: RunEvidence) -> str:
    series = _epoch_series(evidence.records, "weights")
    method = evidence.trained.config.balancing.method
    if not series:
        return section("Balancing weights", note(f"{method}: no task weights were recorded."))
    with new_figure(6.5, 3.2) as figure:
        ax = figure.subplots()
        for task, points in series.items():
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker="o" if len(xs) <= 30 else None, markersize=3, label=task)
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_ylabel("weight (epoch mean)")
        ax.set_title(f"task weights of {method}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
        image = figure_html(figure, "balancing weights")
    return section("Balancing weights", image)


def diagnostics_series(
    records: Sequence[Mapping[str, Any]],
) -> tuple[list[str], list[float], np.ndarray, np.ndarray, np.ndarray]:
    """From the epoch records' ``diagnostics`` entries: task names, steps, and per step the
    K x K gradient cosines, the K gradient norms and the K inner products of each task gradient
    with the applied update (NaN where a task was absent)."""
    tasks: list[str] = []
    steps: list[float] = []
    cosine: list[Any] = []
    norms: list[Any] = []
    inner: list[Any] = []
    for record in records:
        entry = record.get("diagnostics")
        if not isinstance(entry, Mapping) or not entry.get("steps"):
            continue
        tasks = list(entry.get("tasks") or tasks)
        steps += [float(s) for s in entry["steps"]]
        count = len(entry["steps"])
        cosine += list(entry.get("cosine") or [[[None] * len(tasks)] * len(tasks)] * count)
        norms += list(entry.get("norms") or [[None] * len(tasks)] * count)
        inner += list(entry.get("update_inner") or [[None] * len(tasks)] * count)

    def array(values: list[Any], shape: tuple[int, ...]) -> np.ndarray:
        return np.asarray(_nulls_to_nan(values), dtype=np.float64).reshape(shape)

    k, n = len(tasks), len(steps)
    return tasks, steps, array(cosine, (n, k, k)), array(norms, (n, k)), array(inner, (n, k))


def _nulls_to_nan(value: Any) -> Any:
    """Nested lists with JSON nulls → the same lists with NaN."""
    if isinstance(value, list):
        return [_nulls_to_nan(v) for v in value]
    return math.nan if value is None else value


def _cosine_section(evidence: RunEvidence) -> str:
    tasks, steps, cosine, norms, inner = diagnostics_series(evidence.records)
    if not steps:
        return section(
            "Gradient cosine",
            note("No gradient diagnostics in metrics.jsonl (set balancing.diagnostics.every)."),
        )
    pairs = [(i, j) for i in range(len(tasks)) for j in range(i + 1, len(tasks))]
    over_time = np.stack([cosine[:, i, j] for i, j in pairs]) if pairs else np.zeros((0, 0))
    with new_figure(9.0, 2.2 + 0.35 * len(pairs) + 2.6) as figure:
        grid = figure.add_gridspec(2, 2, height_ratios=[1 + 0.12 * len(pairs), 1])
        ax = figure.add_subplot(grid[0, :])
        image = ax.imshow(
            over_time, aspect="auto", cmap="RdBu", vmin=-1, vmax=1, interpolation="nearest"
        )
        ax.set_yticks(range(len(pairs)), [f"{tasks[i]} · {tasks[j]}" for i, j in pairs])
        ticks = np.linspace(0, len(steps) - 1, min(len(steps), 8)).round().astype(int)
        ax.set_xticks(ticks, [f"{steps[t]:.0f}" for t in ticks])
        ax.set_xlabel("step")
        ax.set_title("cosine of task gradients on the shared parameters")
        figure.colorbar(image, ax=ax, fraction=0.03, pad=0.02)
        for column, (values, label) in enumerate(
            ((norms, "gradient norm"), (inner, "⟨task gradient, update⟩"))
        ):
            ax = figure.add_subplot(grid[1, column])
            for k, task in enumerate(tasks):
                ax.plot(steps, values[:, k], label=task, linewidth=1)
            ax.axhline(0.0, color="black", linewidth=0.6)
            ax.set_xlabel("step")
            ax.set_ylabel(label)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize="x-small")
        image_html = figure_html(figure, "gradient cosine over time")
    uphill = [tasks[k] for k in range(len(tasks)) if np.nanmin(inner[:, k], initial=0.0) < 0]
    said = (
        f"A negative inner product means the update pushed that task uphill: {', '.join(uphill)}."
        if uphill
        else "No task gradient had a negative inner product with the applied update."
    )
    return section("Gradient cosine", note(f"{len(steps)} diagnostic steps. {said}"), image_html)


def _gates_section(evidence: RunEvidence) -> str:
    if not evidence.gates:
        return ""
    names = list(evidence.gates)
    width = max(len(v) for v in evidence.gates.values())
    matrix = np.full((len(names), width), np.nan)
    for row, name in enumerate(names):
        matrix[row, : len(evidence.gates[name])] = evidence.gates[name]
    with new_figure(2.5 + 0.6 * width, 1.4 + 0.4 * len(names)) as figure:
        ax = figure.subplots()
        draw_matrix(ax, matrix, names, [f"e{e}" for e in range(width)])
        ax.set_xlabel("expert")
        ax.set_title("mean gate weight on the test split")
        image = figure_html(figure, "gate usage")
    return section(
        "Gate usage",
        note(
            "Each gate's mean weight per expert over the test inputs (forward hooks). Experts "
            "are numbered as the gate sees them: MMoE's shared experts; a PLE/CGC task gate's "
            "own experts then the shared ones; a shared gate's every task's experts, then the "
            "shared ones."
        ),
        image,
    )


def _test_section(evidence: RunEvidence) -> str:
    test = evidence.results.get("test") or {}
    baselines = evidence.results.get("baselines") or {}
    gains = relative_gains(test, baselines, evidence.tasks) if baselines else {}
    rows = []
    for task in evidence.tasks:
        for metric, value in (test.get(task.name) or {}).items():
            single = baselines.get(task.name, {}).get(metric)
            gain = gains.get(task.name, {}).get(metric)
            rows.append(
                [task.name, metric, value, single, None if gain is None else f"{gain:+.2f}"]
            )
    headers = ["task", "metric", "multi-task", "single-task", "gain %"]
    delta = evidence.results.get("delta_m")
    if baselines and isinstance(delta, (int, float)):
        said = f"Δm% = {delta:+.2f} over single-task baselines (mean signed relative gain)."
    else:
        said = "No single-task baselines were trained (train with --single-task for Δm%)."
    return section("Test results", note(said), table(headers, rows))


def _labelled(task: TaskSpec, prediction: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    mask = task.label_mask(target)
    if mask.dim() > 1:
        mask = mask.all(dim=1)
    return prediction[mask], target[mask]


def _classification_tasks(evidence: RunEvidence, kinds: tuple[str, ...]) -> list[TaskSpec]:
    return [t for t in evidence.tasks if t.kind in kinds and t.name in evidence.predictions]


def _confusion_section(evidence: RunEvidence) -> str:
    tasks = _classification_tasks(evidence, ("binary", "multiclass"))
    if not tasks:
        return ""
    images = []
    for task in tasks:
        prediction, target = _labelled(task, *evidence.predictions[task.name])
        if task.kind == "multiclass":
            predicted, truth, classes = prediction.argmax(dim=-1), target.long(), task.num_classes
        else:
            predicted, truth, classes = (prediction >= 0.5).long(), (target >= 0.5).long(), 2
        counts = torch.bincount(truth * classes + predicted, minlength=classes * classes)
        matrix = counts.reshape(classes, classes).numpy()
        accuracy = float(np.trace(matrix) / max(matrix.sum(), 1))
        labels = [str(c) for c in range(classes)]
        side = 2.2 + 0.35 * classes
        with new_figure(side + 1.0, side) as figure:
            ax = figure.subplots()
            draw_matrix(ax, matrix, labels, labels, text=classes <= 20)
            ax.set_xlabel("predicted")
            ax.set_ylabel("true")
            ax.set_title(f"{task.name} (accuracy {accuracy:.3f}, n={int(matrix.sum())})")
            images.append(figure_html(figure, f"confusion matrix of {task.name}"))
    return section("Confusion matrices", note("Test split, labelled rows."), *images)


def calibration_bins(
    probability: Tensor, target: Tensor, bins: int = 10
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Per equal-width probability bin: mean predicted probability, observed frequency of 1 and
    count; and the expected calibration error (count-weighted mean gap).

    Example:
        >>> p, y = torch.tensor([0.1, 0.1, 0.9, 0.9]), torch.tensor([0.0, 0.0, 1.0, 0.0])
        >>> _, observed, count, ece = calibration_bins(p, y, bins=2)
        >>> observed.tolist(), count.tolist(), round(ece, 3)
        ([0.0, 0.5], [2, 2], 0.25)
    """
    p = probability.double().flatten()
    y = (target.double().flatten() >= 0.5).double()
    index = (p * bins).long().clamp(0, bins - 1)
    count = torch.bincount(index, minlength=bins)
    total = count.clamp_min(1).double()
    mean_p = torch.bincount(index, weights=p, minlength=bins) / total
    observed = torch.bincount(index, weights=y, minlength=bins) / total
    ece = float(((mean_p - observed).abs() * count).sum() / max(int(count.sum()), 1))
    keep = count > 0
    return mean_p[keep].numpy(), observed[keep].numpy(), count[keep].numpy(), ece


def _calibration_section(evidence: RunEvidence) -> str:
    tasks = _classification_tasks(evidence, ("binary",))
    if not tasks:
        return ""
    with new_figure(4.0 * len(tasks), 3.6) as figure:
        for ax, task in zip(np.atleast_1d(figure.subplots(1, len(tasks))), tasks, strict=True):
            prediction, target = _labelled(task, *evidence.predictions[task.name])
            mean_p, observed, count, ece = calibration_bins(prediction, target)
            ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=0.8)
            ax.plot(mean_p, observed, marker="o", label="model")
            ax.set_xlim(0, 1)
            ax.set_ylim(0, 1)
            ax.set_xlabel("mean predicted probability")
            ax.set_ylabel("observed frequency of 1")
            ax.set_title(f"{task.name} (ECE {ece:.3f}, n={int(count.sum())})")
            ax.grid(True, alpha=0.3)
        image = figure_html(figure, "calibration")
    return section("Calibration", note("Reliability diagram, 10 equal-width bins."), image)


def _residuals_section(evidence: RunEvidence) -> str:
    tasks = [t for t in evidence.tasks if t.kind == "regression" and t.name in evidence.predictions]
    if not tasks:
        return ""
    rows = []
    with new_figure(7.5, 3.0 * len(tasks)) as figure:
        axes = np.atleast_2d(figure.subplots(len(tasks), 2))
        for (scatter, histogram), task in zip(axes, tasks, strict=True):
            prediction, target = _labelled(task, *evidence.predictions[task.name])
            p, y = prediction.double().flatten().numpy(), target.double().flatten().numpy()
            residual = p - y
            shown = np.random.default_rng(0).permutation(len(y))[:3000]
            scatter.scatter(y[shown], p[shown], s=4, alpha=0.4)
            low, high = (float(np.min(y)), float(np.max(y))) if len(y) else (0.0, 1.0)
            scatter.plot([low, high], [low, high], color="grey", linestyle="--", linewidth=0.8)
            scatter.set_xlabel("true")
            scatter.set_ylabel("predicted")
            scatter.set_title(task.name)
            histogram.hist(residual, bins=40, color="#4C72B0")
            histogram.set_xlabel("residual (predicted − true)")
            histogram.set_ylabel("rows")
            rmse = float(np.sqrt(np.mean(residual**2))) if len(y) else math.nan
            mean = float(np.mean(residual)) if len(y) else math.nan
            rows.append([task.name, len(y), mean, rmse])
        image = figure_html(figure, "residuals")
    return section(
        "Residuals",
        table(["task", "rows", "mean residual", "RMSE"], rows),
        image,
    )


# ----------------------------------------------------------------------------- pages
def run_report(evidence: RunEvidence) -> str:
    """The HTML page of a run (sections that do not apply, e.g. gate usage of a model without
    gates, are left out)."""
    builders = (
        _config_section,
        _data_section,
        _curves_section,
        _weights_section,
        _cosine_section,
        _gates_section,
        _test_section,
        _confusion_section,
        _calibration_section,
        _residuals_section,
    )
    sections = [part for part in (build(evidence) for build in builders) if part]
    config = evidence.trained.config
    subtitle = f"{evidence.folder.path} · {config.balancing.method} · seed {config.seed}"
    return html_page(f"polytask run report: {config.name}", sections, subtitle=subtitle)


def write_run_report(run_dir: Path, output: Path | None = None) -> Path:
    """Write the report of the run in ``run_dir`` to ``output`` (``run_dir/report.html`` by
    default) and return its path."""
    evidence = collect_evidence(Path(run_dir))
    path = Path(output) if output is not None else evidence.folder.path / "report.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, run_report(evidence))
    return path


# ----------------------------------------------------------------------------- comparisons
def _comparison_metrics(comparison: Comparison) -> str:
    """Each task's primary metric per method, mean ± std over seeds, with the baseline."""
    columns = comparison.columns()
    with new_figure(3.6 * len(columns), 3.4) as figure:
        axes = np.atleast_1d(figure.subplots(1, len(columns)))
        names = [row.method for row in comparison.rows]
        for ax, (task, metric) in zip(axes, columns, strict=True):
            stats = [row.stat(task, metric) for row in comparison.rows]
            colours = [f"C{i}" for i in range(len(names))]  # one colour per method, as below
            ax.bar(
                names, [m for m, _ in stats], yerr=[s for _, s in stats], capsize=3, color=colours
            )
            single = comparison.baselines.get(task, {}).get(metric, math.nan)
            if math.isfinite(single):
                ax.axhline(single, color="black", linestyle="--", linewidth=0.8, label="single")
                ax.legend(fontsize="x-small")
            ax.set_title(f"{task} {metric}")
            ax.tick_params(axis="x", rotation=45)
        return figure_html(figure, "per-task metrics")


def _comparison_curves(comparison: Comparison) -> str:
    """Validation loss (mean of the tasks') per epoch, mean ± std over seeds, per method."""
    with new_figure(6.5, 3.4) as figure:
        ax = figure.subplots()
        drawn = False
        for index, row in enumerate(comparison.rows):
            per_epoch: dict[float, list[float]] = {}
            for run_dir in row.run_dirs:
                for record in read_metrics(run_dir):
                    value = _mean_val_loss(record)
                    if value is not None:
                        per_epoch.setdefault(float(record["epoch"]), []).append(value)
            if not per_epoch:
                continue
            epochs = sorted(per_epoch)
            mean = np.array([np.mean(per_epoch[e]) for e in epochs])
            std = np.array([np.std(per_epoch[e]) for e in epochs])
            ax.plot(epochs, mean, label=row.method, color=f"C{index}")
            ax.fill_between(epochs, mean - std, mean + std, alpha=0.15, color=f"C{index}")
            drawn = True
        if not drawn:
            return note("No validation loss was recorded.")
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_ylabel("validation loss (mean over tasks)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
        return figure_html(figure, "validation loss per method")


def _mean_val_loss(record: Mapping[str, Any]) -> float | None:
    val = record.get("val")
    if not isinstance(val, Mapping) or not isinstance(record.get("epoch"), (int, float)):
        return None
    losses = [
        float(entry["loss"])
        for entry in val.values()
        if isinstance(entry, Mapping) and isinstance(entry.get("loss"), (int, float))
    ]
    finite = [v for v in losses if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else None


def comparison_report(comparison: Comparison) -> str:
    """The HTML page of a methods × seeds comparison: Δm% and each task's primary metric with
    error bars (mean ± std over seeds), validation curves, and the table."""
    columns = comparison.columns()
    rows = []
    for row in comparison.rows:
        cells: list[Any] = [row.method]
        for task, metric in columns:
            mean, std = row.stat(task, metric)
            cells.append("—" if math.isnan(mean) else f"{mean:.4f} ± {std:.4f}")
        mean, std = row.delta
        rows.append([*cells, "—" if math.isnan(mean) else f"{mean:+.2f} ± {std:.2f}"])
    rows.append(["single-task", *(comparison.baselines[t][m] for t, m in columns), "0"])
    headers = ["method", *(f"{t} {m}" for t, m in columns), "Δm%"]
    with new_figure(max(4.0, 0.7 * len(comparison.rows) + 2), 3.2) as figure:
        draw_comparison(comparison, figure.subplots())
        delta_image = figure_html(figure, "Δm% per method")
    seeds = ", ".join(map(str, comparison.seeds))
    sections = [
        section(
            "Methods",
            note(f"Mean ± std over seeds {seeds}; best Δm% first."),
            table(headers, rows),
        ),
        section("Multi-task gain", delta_image),
        section("Test metrics", _comparison_metrics(comparison)),
        section("Validation curves", _comparison_curves(comparison)),
    ]
    return html_page(f"polytask comparison: {comparison.name}", sections)


def write_comparison_report(comparison: Comparison, path: Path) -> Path:
    """Write ``comparison_report`` to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, comparison_report(comparison))
    return path
