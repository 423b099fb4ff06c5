"""``polytask export``: a run as one ONNX graph plus the preprocessing JSON beside it."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from polytask.cli.app import command, err
from polytask.errors import ExportError
from polytask.serve.export import export_onnx


class Format(str, Enum):
    onnx = "onnx"


class Quantization(str, Enum):
    int8 = "int8"
    fp16 = "fp16"


class Exporter(str, Enum):
    auto = "auto"
    dynamo = "dynamo"
    torchscript = "torchscript"


@command
def export(
    run_dir: Annotated[Path, typer.Argument(help="a run folder made by `polytask train`")],
    format: Annotated[Format, typer.Option("--format", help="the export format")] = Format.onnx,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="the .onnx file (default RUN_DIR/export/model.onnx)"),
    ] = None,
    quantize: Annotated[
        Quantization | None,
        typer.Option(help="int8: dynamic int8 weights (onnxruntime); fp16: half precision"),
    ] = None,
    opset: Annotated[
        int | None, typer.Option(help="ONNX opset (default: the exporter's)", min=7)
    ] = None,
    checkpoint: Annotated[str, typer.Option(help="best or last")] = "best",
    exporter: Annotated[
        Exporter, typer.Option(help="torch.onnx path: dynamo, torchscript, or auto (dynamo first)")
    ] = Exporter.auto,
) -> None:
    """Export a run to ONNX: one graph from raw inputs to every task's decoded prediction, and
    MODEL.preprocess.json beside it (vocabularies, tokenizer) for the torch-free runtime."""
    if format is not Format.onnx:  # pragma: no cover - typer refuses other values
        raise ExportError(f"--format: only onnx, found {format}")
    result = export_onnx(
        run_dir,
        output,
        quantize=quantize.value if quantize is not None else None,
        opset=opset,
        checkpoint=checkpoint,
        exporter=exporter.value,  # type: ignore[arg-type]
    )
    err.print(
        f"wrote {result.model_path} ({result.size_bytes / 1024:.0f} KiB, opset {result.opset}, "
        f"{result.exporter} exporter"
        + (f", {result.quantize}" if result.quantize else "")
        + f") and {result.preprocess_path}"
    )
