"""``polytask distill``: a smaller multi-task student trained on a run's outputs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from polytask.cli.app import command, err
from polytask.cli.results import print_results
from polytask.run.distill import distill_run


@command
def distill(
    run_dir: Annotated[Path, typer.Argument(help="the teacher: a run folder")],
    student: Annotated[
        str,
        typer.Option(
            help="a size (half, quarter, or a width factor such as 0.3) or a YAML "
            "file whose model section is the student's"
        ),
    ] = "half",
    temperature: Annotated[
        float, typer.Option(help="softening of the teacher's class probabilities", min=0.01)
    ] = 2.0,
    alpha: Annotated[
        float,
        typer.Option(
            help="weight of the ground-truth loss (1 - alpha: the teacher's)", min=0.0, max=1.0
        ),
    ] = 0.5,
    epochs: Annotated[int | None, typer.Option(help="default: the teacher's", min=1)] = None,
    method: Annotated[
        str | None, typer.Option(help="balancing method (default: the teacher's)")
    ] = None,
    checkpoint: Annotated[
        str, typer.Option(help="the teacher's checkpoint: best or last")
    ] = "best",
) -> None:
    """Distil a run into a smaller student (a new run folder beside it): every task learns from
    the teacher's soft outputs and the labels at once."""
    result = distill_run(
        run_dir,
        student,
        temperature=temperature,
        alpha=alpha,
        epochs=epochs,
        method=method,
        checkpoint=checkpoint,
    )
    print_results(result)
    err.print(f"wrote the student run to {result.run_dir}")
