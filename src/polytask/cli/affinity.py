"""``polytask affinity``: which tasks help each other, and how to group them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from polytask.analysis.affinity import (
    AffinityResult,
    groups_text,
    task_affinity,
    train_groups,
    write_affinity,
)
from polytask.cli.app import command, err, out
from polytask.run.recipes import load_recipe


@command
def affinity(
    config: Annotated[
        str, typer.Argument(help="a YAML run configuration or a recipe's name (`polytask recipes`)")
    ],
    overrides: Annotated[
        list[str] | None, typer.Argument(help="key=value overrides, e.g. data.params.blocks=2")
    ] = None,
    steps: Annotated[
        int, typer.Option(help="training steps over which affinity is averaged")
    ] = 200,
    groups: Annotated[int, typer.Option(help="best split for 1..GROUPS groups")] = 3,
    lookahead_lr: Annotated[
        float | None,
        typer.Option(help="step size of the lookahead SGD step [default: optimizer.lr]"),
    ] = None,
    train_groups_: Annotated[
        bool,
        typer.Option(
            "--train-groups",
            help="train the suggested split (the highest predicted total affinity over 1..GROUPS "
            "groups; one model per group) and one model for all tasks, and report both Δm% "
            "against single-task baselines",
        ),
    ] = False,
    output: Annotated[
        Path | None,
        typer.Option(
            help="folder for affinity.{json,md,png,html} [default: output_dir/affinity-NAME]"
        ),
    ] = None,
    progress: Annotated[bool, typer.Option(help="show progress bars")] = True,
) -> None:
    """Measure the lookahead inter-task affinity (Fifty et al., NeurIPS 2021) during a short
    training run of CONFIG, and print the best split of the tasks into 1..GROUPS groups with its
    predicted total affinity; writes a table, a heatmap and an HTML page."""
    cfg = load_recipe(config, overrides or [])
    result = task_affinity(
        cfg, steps=steps, groups=groups, lookahead_lr=lookahead_lr, progress=progress
    )
    folder = output or Path(cfg.output_dir) / f"affinity-{cfg.name}"
    _print_result(result)
    outcomes = []
    if train_groups_:
        outcomes = train_groups(cfg, result.suggested, output_dir=folder, progress=progress)
        for outcome in outcomes:
            out.print(f"{outcome.label}: {groups_text(outcome.groups)}  Δm% {outcome.delta_m:+.2f}")
    paths = write_affinity(result, folder, outcomes)
    err.print("wrote " + ", ".join(str(p) for p in paths))


def _print_result(result: AffinityResult) -> None:
    matrix = Table(title=f"lookahead affinity Z(i→j), {result.steps} steps")
    matrix.add_column("i → j")
    for task in result.tasks:
        matrix.add_column(task, justify="right")
    for i, task in enumerate(result.tasks):
        matrix.add_row(
            task, *("—" if i == j else f"{v:.4g}" for j, v in enumerate(result.affinity[i]))
        )
    out.print(matrix)
    best = Table(title="best split per number of groups")
    for name in ("groups", "split", "predicted total affinity"):
        best.add_column(name)
    for split in result.splits:
        best.add_row(str(len(split.groups)), groups_text(split.groups), f"{split.total:.4g}")
    out.print(best)
    out.print(f"suggested: {groups_text(result.suggested.groups)}")
