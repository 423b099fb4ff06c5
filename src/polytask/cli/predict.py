"""``polytask predict``: every task's prediction for each row of a file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from polytask.cli.app import command, err
from polytask.serve.predict import predict_file


@command
def predict(
    run_dir: Annotated[Path, typer.Argument(help="a run folder made by `polytask train`")],
    input: Annotated[Path, typer.Argument(help="CSV or Parquet file of inputs")],
    output: Annotated[Path, typer.Option("--output", "-o", help="CSV or Parquet file to write")],
    checkpoint: Annotated[str, typer.Option(help="best or last")] = "best",
    keep: Annotated[
        str,
        typer.Option(
            help="input columns to copy to the output before the predictions, comma-separated "
            "(IDs), e.g. --keep user_id,item_id"
        ),
    ] = "",
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="replace OUTPUT if it exists")
    ] = False,
) -> None:
    """Predict every task for each row of a CSV/Parquet file (one column per task out)."""
    columns = [name.strip() for name in keep.split(",") if name.strip()]
    rows = predict_file(
        run_dir, input, output, checkpoint=checkpoint, keep=columns, overwrite=overwrite
    )
    err.print(f"wrote {rows} predictions to {output}")
