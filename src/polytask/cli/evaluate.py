"""``polytask evaluate``: test metrics of a run's best checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from polytask.cli.app import command
from polytask.cli.results import print_results
from polytask.run import evaluate_with_baselines


@command
def evaluate(
    run_dir: Annotated[Path, typer.Argument(help="a run folder made by `polytask train`")],
    baselines: Annotated[
        bool, typer.Option("--baselines", help="train missing single-task baselines for Δm%")
    ] = False,
) -> None:
    """Evaluate a run's best checkpoint on its test split."""
    print_results(evaluate_with_baselines(run_dir, baselines=baselines))
