"""Inter-task affinity by lookahead (TAG: Fifty, Amid, Zhao, Yu, Anil & Finn, "Efficiently
Identifying Task Groupings for Multi-Task Learning", NeurIPS 2021).

During a short training run of the configured model on all tasks, at each measured step ``t``
and for each task ``i``, the shared parameters take one lookahead SGD step on task ``i``'s loss
alone, ``θ_s' = θ_s − η ∇_{θ_s} L_i``, with every task's own parameters unchanged; the affinity
of ``i`` onto ``j`` is how much that step lowered ``j``'s loss on the same batch,

    Z^t_{i→j} = 1 − L_j(θ_s', θ_j) / L_j(θ_s, θ_j),

and ``Z_{i→j}`` is its mean over the steps (positive: a step on ``i`` helps ``j``). Losses are
taken in evaluation mode (no dropout), so both sides of the ratio see the same network. The
training update itself is the configured balancing method's, as in a normal run.
``polytask.analysis.grouping`` turns the matrix into the best split of the tasks into groups.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from polytask.analysis.grouping import Split, best_splits
from polytask.analysis.html import figure_html, html_page, new_figure, note, png_bytes, section
from polytask.analysis.html import table as html_table
from polytask.config import RunConfig
from polytask.data.batches import Batch
from polytask.data.preprocess import inputs_to
from polytask.errors import ConfigError
from polytask.evaluate import TaskMetrics, delta_m
from polytask.io import strict_json, write_bytes_atomic, write_text_atomic
from polytask.models import MultiTaskModel
from polytask.run.build import (
    build_balancer_for,
    build_model_for,
    build_optimization,
    seed_everything,
)
from polytask.run.data import build_data, train_batches
from polytask.run.experiments import subset_config, train_with_baselines
from polytask.run.single import train_run
from polytask.runtime.device import resolve_device
from polytask.tasks import TaskSpec

__all__ = [
    "AffinityResult",
    "GroupingOutcome",
    "LookaheadAffinity",
    "task_affinity",
    "train_groups",
    "write_affinity",
]


class LookaheadAffinity:
    """Accumulates ``Z_{i→j}`` over steps, on the model's device (no host sync per step).

    Example:
        >>> from polytask.models import build_model
        >>> tasks = [TaskSpec("a", "regression"), TaskSpec("b", "regression")]
        >>> model = build_model(tasks, (3,), encoder_params={"hidden": [4]})
        >>> x, y = torch.randn(8, 3), {"a": torch.randn(8), "b": torch.randn(8)}
        >>> meter = LookaheadAffinity(model, tasks, lookahead_lr=0.1)
        >>> meter.measure(x, y)
        >>> meter.matrix().shape
        (2, 2)
    """

    def __init__(
        self, model: MultiTaskModel, tasks: Sequence[TaskSpec], *, lookahead_lr: float
    ) -> None:
        if not lookahead_lr > 0:
            raise ConfigError(f"lookahead learning rate must be > 0, found {lookahead_lr}")
        self.model, self.tasks, self.lr = model, list(tasks), lookahead_lr
        names = {id(p): n for n, p in model.named_parameters()}
        self.shared = [p for p in model.shared_parameters() if p.requires_grad]
        if not self.shared:
            raise ConfigError("affinity: the model has no shared parameters to look ahead on")
        self.shared_names = [names[id(p)] for p in self.shared]
        k = len(self.tasks)
        device = self.shared[0].device
        self.total = torch.zeros(k, k, dtype=torch.float64, device=device)
        self.count = torch.zeros(k, k, dtype=torch.float64, device=device)

    def _losses(self, inputs: Any, targets: dict[str, Tensor], params: dict[str, Tensor]) -> Tensor:
        outputs = torch.func.functional_call(self.model, params, (inputs,)).outputs
        return torch.stack(
            [t.compute_loss(outputs[t.name], targets[t.name])[0] for t in self.tasks]
        )

    def measure(self, inputs: Any, targets: dict[str, Tensor]) -> None:
        """Add one step's ``Z^t`` (tasks without a labelled sample in the batch are skipped)."""
        was_training = self.model.training
        self.model.eval()
        try:
            out = self.model(inputs).outputs
            pairs = [t.compute_loss(out[t.name], targets[t.name]) for t in self.tasks]
            losses = torch.stack([loss for loss, _ in pairs])
            present = torch.stack([count > 0 for _, count in pairs])
            rows = []
            for i in range(len(self.tasks)):
                grads = torch.autograd.grad(
                    losses[i], self.shared, retain_graph=True, allow_unused=True
                )
                ahead = {
                    name: p.detach() - self.lr * g if g is not None else p.detach()
                    for name, p, g in zip(self.shared_names, self.shared, grads, strict=True)
                }
                with torch.no_grad():
                    rows.append(self._losses(inputs, targets, ahead))
        finally:
            self.model.train(was_training)
        before = losses.detach().double()
        after = torch.stack(rows).double()  # [i, j]: L_j after a step on i
        valid = present[:, None] & present[None, :] & (before[None, :] > 0)
        ratio = after / torch.where(valid, before[None, :], torch.ones_like(after))
        self.total += torch.where(valid, 1.0 - ratio, torch.zeros_like(ratio))
        self.count += valid.double()

    def matrix(self) -> np.ndarray:
        """The mean ``Z_{i→j}`` so far (row ``i``, column ``j``); NaN where never measured."""
        mean = self.total / self.count
        return mean.masked_fill(self.count == 0, math.nan).cpu().numpy()


@dataclass
class AffinityResult:
    """The affinity matrix of one configuration and the best split per number of groups."""

    name: str
    tasks: list[str]
    affinity: np.ndarray
    steps: int
    lookahead_lr: float
    splits: list[Split] = field(default_factory=list)

    @property
    def suggested(self) -> Split:
        """The split with the highest predicted total affinity over every number of groups
        tried (the fewest groups among equals)."""
        return max(self.splits, key=lambda s: (s.total, -len(s.groups)))

    def to_json(self) -> dict[str, Any]:
        """What ``affinity.json`` holds."""
        return {
            "name": self.name,
            "tasks": self.tasks,
            "affinity": self.affinity.tolist(),
            "steps": self.steps,
            "lookahead_lr": self.lookahead_lr,
            "splits": [
                {"groups": s.groups, "total_affinity": s.total, "exhaustive": s.exhaustive}
                for s in self.splits
            ],
            "suggested": self.suggested.groups if self.splits else None,
        }


def _cycle(batches: Any) -> Iterator[Batch]:
    epoch = 0
    while True:
        if hasattr(batches, "set_epoch"):
            batches.set_epoch(epoch)
        yield from batches
        epoch += 1


def task_affinity(
    config: RunConfig,
    *,
    steps: int = 200,
    groups: int = 3,
    lookahead_lr: float | None = None,
    progress: bool = False,
) -> AffinityResult:
    """Train ``config``'s model for ``steps`` steps measuring the lookahead affinity at every
    step (SGD lookahead with ``lookahead_lr``, the optimizer's learning rate by default), then
    find the best split into 1..``groups`` groups."""
    if steps < 1:
        raise ConfigError(f"--steps: must be >= 1, found {steps}")
    if groups < 1:
        raise ConfigError(f"--groups: must be >= 1, found {groups}")
    seed_everything(config.seed, deterministic=config.train.deterministic)
    bundle = build_data(config)
    if len(bundle.tasks) < 2:
        raise ConfigError("data.tasks: task affinity needs at least two tasks")
    device = resolve_device(config.train.device)
    model = build_model_for(config, bundle.tasks, bundle.input_shape).to(device)
    balancer = build_balancer_for(config, bundle.tasks).to(device)
    batches = train_batches(config, bundle, rank=0, world_size=1)
    optimizer, scheduler = build_optimization(config, model, balancer, steps_per_epoch=len(batches))
    lr = config.optimizer.lr if lookahead_lr is None else lookahead_lr
    meter = LookaheadAffinity(model, bundle.tasks, lookahead_lr=lr)
    model.train()
    stream = _cycle(batches)
    from rich.progress import track

    for _ in track(range(steps), description="affinity", disable=not progress):
        inputs, labels = next(stream)
        inputs = inputs_to(inputs, device)
        targets = {name: y.to(device, non_blocking=True) for name, y in labels.items()}
        meter.measure(inputs, targets)
        _train_step(model, balancer, bundle.tasks, optimizer, inputs, targets, meter.shared)
        scheduler.step()
    names = [t.name for t in bundle.tasks]
    matrix = meter.matrix()
    missing = [names[i] for i in range(len(names)) if np.isnan(matrix[i]).all()]
    if missing:
        raise ConfigError(
            f"affinity: no labelled sample of {', '.join(missing)} in {steps} steps; "
            "raise --steps or data.batch_size"
        )
    result = AffinityResult(config.name, names, np.nan_to_num(matrix), steps, lr)
    result.splits = best_splits(result.affinity, names, groups)
    return result


def _train_step(
    model: MultiTaskModel,
    balancer: Any,
    tasks: Sequence[TaskSpec],
    optimizer: torch.optim.Optimizer,
    inputs: Any,
    targets: dict[str, Tensor],
    shared: Sequence[Tensor],
) -> None:
    """One ordinary training step with the configured balancing method."""
    optimizer.zero_grad(set_to_none=True)
    out = model(inputs)
    pairs = [t.compute_loss(out.outputs[t.name], targets[t.name]) for t in tasks]
    losses = {t.name: loss for t, (loss, _) in zip(tasks, pairs, strict=True)}
    present = torch.stack([count > 0 for _, count in pairs])
    balancer.backward(losses, shared_params=shared, features=out.features, present=present)
    optimizer.step()


# ----------------------------------------------------------------------------- train the groups
@dataclass
class GroupingOutcome:
    """Test metrics and Δm% of one way to serve the tasks (one model, or one per group)."""

    label: str
    groups: list[list[str]]
    test: TaskMetrics
    delta_m: float


def train_groups(
    config: RunConfig, split: Split, *, output_dir: Path, progress: bool = False
) -> list[GroupingOutcome]:
    """Train one model for all tasks (with its single-task baselines) and one model per group
    of ``split`` (a group of one task is its single-task baseline), and compare their Δm%."""
    folder = output_dir / f"groups-{config.name}"
    everything = config.model_copy(
        update={
            "name": "all-tasks",
            "output_dir": str(folder),
            "evaluate": config.evaluate.model_copy(update={"baselines": True}),
        }
    )
    joint = train_with_baselines(everything, baselines=True, progress=progress)
    assert joint.baselines is not None and joint.delta_m is not None
    tasks = joint.tasks
    grouped: TaskMetrics = {}
    for index, group in enumerate(split.groups, start=1):
        if len(split.groups) == 1:  # the one model already is this grouping
            grouped = dict(joint.test)
        elif len(group) == 1:
            grouped[group[0]] = joint.baselines[group[0]]
            continue
        name = f"group{index}-" + "-".join(group)
        sub = subset_config(config, group, name=name).model_copy(
            update={
                "output_dir": str(folder),
                "evaluate": config.evaluate.model_copy(update={"baselines": False}),
            }
        )
        result = train_run(sub, run_dir=folder / name, progress=progress, description=name)
        grouped.update({task: result.test[task] for task in group})
    label = f"{len(split.groups)} group{'s' if len(split.groups) > 1 else ''}"
    return [
        GroupingOutcome("one model", [[t.name for t in tasks]], joint.test, joint.delta_m),
        GroupingOutcome(label, split.groups, grouped, delta_m(grouped, joint.baselines, tasks)),
    ]


# ----------------------------------------------------------------------------- writing
def affinity_markdown(result: AffinityResult) -> str:
    """The affinity matrix and the best splits as Markdown tables."""
    tasks = result.tasks
    lines = [
        f"Lookahead affinity Z(i→j) of `{result.name}` ({result.steps} steps, "
        f"lookahead lr {result.lookahead_lr:g}); row i is the task stepped on, column j the "
        "task whose loss changes.",
        "",
        "| i → j | " + " | ".join(tasks) + " |",
        "|---" * (len(tasks) + 1) + "|",
    ]
    for i, task in enumerate(tasks):
        cells = ["—" if i == j else f"{result.affinity[i, j]:.4g}" for j in range(len(tasks))]
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    lines += ["", "| groups | best split | predicted total affinity |", "|---|---|---|"]
    for split in result.splits:
        shown = groups_text(split.groups)
        lines.append(f"| {len(split.groups)} | {shown} | {split.total:.4g} |")
    return "\n".join(lines) + "\n"


@contextmanager
def affinity_heatmap(result: AffinityResult) -> Iterator[Any]:
    """The matplotlib figure of the affinity matrix (cleared on exit)."""
    size = 0.6 * len(result.tasks)
    with new_figure(size + 2.5, size + 1.6) as figure:
        ax = figure.subplots()
        across = result.affinity.copy()
        np.fill_diagonal(across, np.nan)  # a task onto itself: not used in grouping, and larger
        draw_matrix(ax, across, result.tasks, result.tasks, diverging=True)
        ax.set_xlabel("task j (loss measured)")
        ax.set_ylabel("task i (step taken)")
        ax.set_title(f"{result.name}: lookahead affinity Z(i→j)", fontsize="medium")
        yield figure


def groups_text(groups: Sequence[Sequence[str]]) -> str:
    """``{a, b} · {c}``."""
    return " · ".join("{" + ", ".join(g) + "}" for g in groups)


def draw_matrix(
    ax: Any,
    matrix: np.ndarray,
    rows: Sequence[str],
    columns: Sequence[str],
    *,
    diverging: bool = False,
    text: bool = True,
) -> Any:
    """A labelled heatmap of ``matrix`` on ``ax`` (diverging colours centred on 0 when
    ``diverging``), each cell annotated when ``text``; returns the image."""
    values = np.asarray(matrix, dtype=np.float64)
    finite = values[np.isfinite(values)]
    if diverging:
        bound = float(np.abs(finite).max()) if finite.size else 1.0
        image = ax.imshow(values, cmap="RdBu", vmin=-bound or -1, vmax=bound or 1)
    else:
        image = ax.imshow(values, cmap="viridis")
    ax.set_xticks(range(len(columns)), [str(c) for c in columns], rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), [str(r) for r in rows])
    if text and values.size <= 400:
        for (i, j), value in np.ndenumerate(values):
            if np.isfinite(value):
                shade = float(image.norm(value))  # dark ends: RdBu both, viridis the low one
                dark = abs(shade - 0.5) > 0.35 if diverging else shade < 0.45
                ax.text(
                    j,
                    i,
                    f"{value:.2g}",
                    ha="center",
                    va="center",
                    fontsize="small",
                    color="white" if dark else "black",
                )
    ax.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    return image


def write_affinity(
    result: AffinityResult, output_dir: Path, outcomes: Sequence[GroupingOutcome] = ()
) -> list[Path]:
    """Write ``affinity.json``, ``affinity.md``, ``affinity.png`` and a self-contained
    ``affinity.html`` to ``output_dir``; returns their paths."""
    output_dir.mkdir(parents=True, exist_ok=True)
    markdown = affinity_markdown(result) + _outcomes_markdown(outcomes)
    data = result.to_json()
    if outcomes:
        data["trained"] = [
            {"label": o.label, "groups": o.groups, "test": o.test, "delta_m": o.delta_m}
            for o in outcomes
        ]
    with affinity_heatmap(result) as figure:
        png = png_bytes(figure, dpi=110)
        image = figure_html(figure, "affinity heatmap", dpi=110)
    paths = [output_dir / n for n in ("affinity.json", "affinity.md", "affinity.png")]
    write_text_atomic(paths[0], strict_json(data, indent=2))
    write_text_atomic(paths[1], markdown)
    write_bytes_atomic(paths[2], png)
    paths.append(output_dir / "affinity.html")
    write_text_atomic(paths[3], _affinity_html(result, image, outcomes))
    return paths


def _outcomes_markdown(outcomes: Sequence[GroupingOutcome]) -> str:
    if not outcomes:
        return ""
    lines = ["", "| trained | groups | Δm% vs single-task |", "|---|---|---|"]
    for o in outcomes:
        shown = groups_text(o.groups)
        lines.append(f"| {o.label} | {shown} | {o.delta_m:+.2f} |")
    return "\n".join(lines) + "\n"


def _affinity_html(result: AffinityResult, image: str, outcomes: Sequence[GroupingOutcome]) -> str:
    tasks = result.tasks
    rows = [
        [task, *(None if i == j else float(result.affinity[i, j]) for j in range(len(tasks)))]
        for i, task in enumerate(tasks)
    ]
    splits = [[len(s.groups), groups_text(s.groups), s.total] for s in result.splits]
    method = "every split" if all(s.exhaustive for s in result.splits) else "greedy search"
    parts = [
        section(
            "Affinity",
            note(
                f"Z(i→j) = 1 − L_j(after a lookahead step on task i) / L_j(before), mean over "
                f"{result.steps} steps (lookahead lr {result.lookahead_lr:g}); positive: a step "
                "on i helps j. Fifty et al., NeurIPS 2021."
            ),
            html_table(["i → j", *tasks], rows),
            image,
        ),
        section(
            "Best splits",
            note(f"Best split per number of groups ({method})."),
            html_table(["groups", "split", "predicted total affinity"], splits),
        ),
    ]
    if outcomes:
        trained = [[o.label, groups_text(o.groups), o.delta_m] for o in outcomes]
        parts.append(
            section(
                "Trained groupings", html_table(["trained", "groups", "Δm%"], trained, digits=2)
            )
        )
    return html_page(f"Task affinity: {result.name}", parts)
