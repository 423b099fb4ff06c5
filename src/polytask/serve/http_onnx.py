"""The ``onnx`` engine of the HTTP service: the model exported by ``polytask export``, run by
``polytask.serve.onnx_runtime.OnnxPredictor`` (onnxruntime and numpy; no torch)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from polytask.serve.engines import EngineOutput
from polytask.serve.onnx_runtime import PLAIN_INPUT, InputColumn, OnnxPredictor, task_columns
from polytask.serve.schema import WHOLE_INPUT, InputField, OutputTask


def field_of(column: InputColumn) -> InputField | None:
    """The request field of an exported model's input column; ``None`` for a presence flag
    (the service sets it from whether a row gives the block)."""
    if column.dtype == "bool":
        return None
    if column.categorical:
        return InputField(column.name, "category", optional=True)
    if column.dtype == "string":
        return InputField(column.name, "text", optional=column.optional)
    if column.shape:  # a one-tensor model's input has the torch engine's field name
        name = WHOLE_INPUT if column.name == PLAIN_INPUT else column.name
        return InputField(name, "tensor", tuple(column.shape), optional=column.optional)
    return InputField(column.name, "number", optional=column.optional)


class OnnxEngine:
    """An exported model (``model.onnx`` and ``model.preprocess.json`` beside it); one graph
    run per batch gives the prediction columns and the class probabilities."""

    name = "onnx"

    def __init__(self, model_path: str | Path, *, threads: int | None = None) -> None:
        self.predictor = OnnxPredictor(model_path, threads=threads)
        self.model_path = Path(model_path)
        self.run_name = str(self.predictor.metadata.get("run", self.model_path.parent.name))
        schema = [field_of(column) for column in self.predictor.input_schema]
        self.fields = [spec for spec in schema if spec is not None]
        self.tasks = [
            OutputTask(
                t.name,
                t.kind,
                t.num_classes,
                tuple(t.columns),
                tuple(t.classes or ()) if t.kind in ("multiclass", "segmentation") else (),
            )
            for t in self.predictor.tasks
        ]

    def predict(self, columns: Mapping[str, Any]) -> EngineOutput:
        """Every task's predictions for the rows of ``columns``, in one graph run (the same
        columns as ``OnnxPredictor.predict``)."""
        if WHOLE_INPUT in columns and PLAIN_INPUT not in columns:
            columns = {PLAIN_INPUT if k == WHOLE_INPUT else k: v for k, v in columns.items()}
        outputs = self.predictor.run(columns)
        predictions: dict[str, np.ndarray] = {}
        probabilities: dict[str, np.ndarray] = {}
        for task in self.predictor.tasks:
            predictions.update(task_columns(task, outputs))
            if task.kind == "multiclass":
                probabilities[task.name] = outputs[task.output]
        return EngineOutput(predictions, probabilities)
