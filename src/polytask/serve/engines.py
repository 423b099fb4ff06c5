"""What answers a prediction request: the trained PyTorch model of a run folder, or the ONNX
model exported from it (``polytask export``). Both take the request's columns (one per input
field, see ``polytask.serve.schema.columns_from_rows``) and return ``predict_arrays``'s columns
plus each multiclass task's class probabilities; neither is thread-safe, so the service calls
one ``predict`` at a time (``polytask.serve.batching``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from polytask.errors import CheckpointError, ConfigError
from polytask.serve.schema import (
    PRESENT_SUFFIX,
    WHOLE_INPUT,
    InputField,
    OutputTask,
    input_fields,
    output_task,
)

EngineName = Literal["torch", "onnx"]


@dataclass
class EngineOutput:
    """Predictions for N rows: ``columns`` as ``predict_arrays`` names them, and the class
    probabilities ``[N, C]`` of each multiclass task."""

    columns: dict[str, np.ndarray]
    probabilities: dict[str, np.ndarray]


class Engine(Protocol):
    """A loaded model that predicts every task for a batch of request columns."""

    #: ``torch`` or ``onnx``
    name: str
    fields: list[InputField]
    tasks: list[OutputTask]
    #: the file the weights were read from (its SHA-256 identifies the model version)
    model_path: Path

    def predict(self, columns: Mapping[str, Any]) -> EngineOutput: ...


def number_of_rows(columns: Mapping[str, Any]) -> int:
    return len(next(iter(columns.values()))) if columns else 0


def filled_block(values: Any, spec: InputField) -> tuple[Any, np.ndarray]:
    """An optional block's column with the missing rows (``None``) filled as the dataset fills
    them (zeros, empty texts), and the bool ``[N]`` of the rows that carry it."""
    present = np.array([v is not None for v in values], dtype=bool)
    if spec.kind == "text":
        return ["" if v is None else str(v) for v in values], present
    if isinstance(values, np.ndarray):
        return values, present
    zeros = np.zeros(spec.shape, dtype=np.float32)
    return np.stack([zeros if v is None else v for v in values]), present


class TorchEngine:
    """The run's PyTorch model (``RunFolder.load_trained``: safetensors, no pickle), with the
    run's fitted preprocessing; predictions equal ``predict_arrays`` on the same rows."""

    name = "torch"

    def __init__(self, run_dir: str | Path, *, checkpoint: str = "best") -> None:
        import torch

        from polytask.run.folder import RunFolder

        folder = RunFolder(run_dir)
        self.trained = folder.load_trained(checkpoint)
        self.model_path = folder.checkpoint(checkpoint)
        self.run_name = self.trained.config.name
        self._torch = torch
        trained = self.trained
        text_blocks = [k for k, p in trained.preprocessors.items() if p.kind == "tokenizer"]
        self.fields = input_fields(
            trained.input_shape, trained.feature_names, trained.categorical_names, text_blocks
        )
        self.tasks = [output_task(t.name, t.kind, t.num_classes) for t in trained.tasks]

    def raw_inputs(self, columns: Mapping[str, Any]) -> Any:
        """The model's raw inputs (as its dataset gives them) from the request columns."""
        trained, shape = self.trained, self.trained.input_shape
        if not isinstance(shape, dict):
            if trained.feature_names is None:
                return np.asarray(columns[WHOLE_INPUT], dtype=np.float32)
            return np.stack([columns[n] for n in trained.feature_names], axis=1)
        raw: dict[str, Any] = {}
        for spec in self.fields:
            if spec.kind in ("number", "category"):
                continue
            raw[spec.name] = columns[spec.name]
            if spec.optional:
                raw[spec.name], raw[spec.name + PRESENT_SUFFIX] = filled_block(
                    columns[spec.name], spec
                )
            elif spec.kind == "text":
                raw[spec.name] = [str(v) for v in columns[spec.name]]
        if "numeric" in shape:
            names = trained.feature_names or []
            raw["numeric"] = np.stack([columns[n] for n in names], axis=1).astype(np.float32)
        if "categorical" in shape:
            names = trained.categorical_names or []
            raw["categorical"] = np.stack([columns[n] for n in names], axis=1)
        return raw

    def predict(self, columns: Mapping[str, Any]) -> EngineOutput:
        """Every task's predictions for the rows of ``columns``, in one forward pass."""
        from polytask.evaluate.inference import decoded_predictions
        from polytask.serve.predict import prediction_columns

        rows = number_of_rows(columns)
        inputs = self.trained.preprocess(self.raw_inputs(columns))
        with self._torch.inference_mode():
            decoded = decoded_predictions(
                self.trained.model, inputs, self.trained.tasks, batch_size=max(rows, 1)
            )
        arrays = {name: values.numpy() for name, values in decoded.items()}
        return EngineOutput(
            prediction_columns(arrays, self.trained.tasks),
            {t.name: arrays[t.name] for t in self.trained.tasks if t.kind == "multiclass"},
        )


def load_engine(
    run_dir: str | Path,
    engine: str = "torch",
    *,
    checkpoint: str = "best",
    onnx_model: str | Path | None = None,
) -> Engine:
    """The engine named ``engine`` for the run in ``run_dir``: ``torch`` (the checkpoint) or
    ``onnx`` (``onnx_model``, by default ``RUN_DIR/export/model.onnx`` made by
    ``polytask export``). ``ConfigError`` for another name; ``CheckpointError`` (one line)
    when the files are missing."""
    if engine == "torch":
        return TorchEngine(run_dir, checkpoint=checkpoint)
    if engine == "onnx":
        from polytask.serve.http_onnx import OnnxEngine

        path = Path(onnx_model) if onnx_model is not None else Path(run_dir) / "export/model.onnx"
        if not path.is_file():
            raise CheckpointError(
                f"{path}: no ONNX model; run `polytask export {run_dir} --format onnx` first"
            )
        return OnnxEngine(path)
    raise ConfigError(f"engine: must be one of torch, onnx, found {engine!r}")
