"""``polytask report``: one self-contained HTML page about a finished run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from polytask.analysis.report import write_run_report
from polytask.cli.app import command, err


@command
def report(
    run_dir: Annotated[Path, typer.Argument(help="a finished run folder")],
    output: Annotated[
        Path | None, typer.Option(help="the HTML file to write [default: RUN_DIR/report.html]")
    ] = None,
) -> None:
    """Write one HTML file about a finished run that opens offline: configuration and data,
    training curves, balancing weights, gradient cosines (with balancing.diagnostics), gate usage
    (MMoE/PLE), the test table with baselines and Δm%, confusion matrices, calibration and
    residuals."""
    path = write_run_report(run_dir, output)
    err.print(f"wrote {path}")
