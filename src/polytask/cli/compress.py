"""``polytask compress``: magnitude pruning with a fine-tuning epoch, or dynamic int8
quantization of the PyTorch model."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from polytask.cli.app import command, err
from polytask.cli.results import print_results
from polytask.errors import ConfigError
from polytask.io import strict_json, write_text_atomic


class TorchQuantization(str, Enum):
    int8 = "int8"


@command
def compress(
    run_dir: Annotated[Path, typer.Argument(help="a run folder made by `polytask train`")],
    prune: Annotated[
        float | None,
        typer.Option(help="fraction of Linear/Conv weights to zero (smallest first), e.g. 0.5"),
    ] = None,
    epochs: Annotated[int, typer.Option(help="fine-tuning epochs after pruning", min=1)] = 1,
    lr_scale: Annotated[
        float, typer.Option(help="fine-tuning learning rate, as a fraction of the run's")
    ] = 0.1,
    quantize: Annotated[
        TorchQuantization | None,
        typer.Option(
            help="int8: dynamic int8 Linear layers (torch.ao), evaluated on the test "
            "split; for a file to deploy use `polytask export --quantize int8`"
        ),
    ] = None,
    checkpoint: Annotated[str, typer.Option(help="best or last")] = "best",
) -> None:
    """Compress a run: --prune FRACTION writes a pruned, fine-tuned run folder beside it;
    --quantize int8 measures the dynamically quantized PyTorch model (RUN_DIR/compressed/)."""
    if (prune is None) == (quantize is None):
        raise ConfigError("compress: give one of --prune FRACTION or --quantize int8")
    if prune is not None:
        from polytask.serve.compress import prune_run

        result = prune_run(run_dir, prune, epochs=epochs, lr_scale=lr_scale, checkpoint=checkpoint)
        print_results(result)
        err.print(f"wrote the pruned run to {result.run_dir}")
        return
    from polytask.serve.compress import evaluate_quantized_torch

    report = evaluate_quantized_torch(run_dir, checkpoint=checkpoint)
    target = Path(run_dir) / "compressed" / "torch-int8.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(target, strict_json(report, indent=2))
    err.print(
        f"weights: {report['size_fp32'] / 1024:.0f} KiB fp32, {report['size_int8'] / 1024:.0f} "
        "KiB int8; test metrics of both in the report"
    )
    err.print(f"wrote {target}")
