"""Batch prediction: a table of inputs in, one column per task out."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from polytask.data.files import read_features, read_frame, write_frame
from polytask.data.preprocess import Inputs
from polytask.errors import DataError
from polytask.evaluate.inference import decoded_predictions
from polytask.models import MultiTaskModel
from polytask.run.folder import load_trained
from polytask.tasks import TaskSpec


def predict_arrays(
    model: MultiTaskModel,
    tasks: Sequence[TaskSpec],
    inputs: Inputs,
    *,
    batch_size: int = 1024,
    device: torch.device | str = "cpu",
) -> dict[str, np.ndarray]:
    """Predictions per output column: the class (multiclass), the probability of 1 (binary),
    one probability column per label (multilabel, ``task_i``), the value in original units
    (regression; ``task_i`` per output when there are several)."""
    decoded = decoded_predictions(model, inputs, tasks, batch_size=batch_size, device=device)
    columns: dict[str, np.ndarray] = {}
    for task in tasks:
        values = decoded[task.name].numpy()
        if task.kind == "multiclass":
            columns[task.name] = values.argmax(axis=-1)
        elif values.ndim == 1:
            columns[task.name] = values
        else:
            for i in range(values.shape[1]):
                columns[f"{task.name}_{i}"] = values[:, i]
    return columns


def predict_file(
    run_dir: Path, input_path: Path, output_path: Path, *, checkpoint: str = "best"
) -> int:
    """Predict every task for each row of ``input_path`` (CSV/Parquet) and write one column per
    task to ``output_path``; returns the number of rows. Inputs are the run's feature columns
    (by name), or, for runs without feature names (images), every column in order."""
    import pandas as pd

    trained = load_trained(run_dir, checkpoint=checkpoint)
    shape = trained.input_shape
    raw: Any
    if isinstance(shape, dict):  # named blocks: numeric features and categorical columns
        frame = read_frame(input_path)
        raw = {}
        if "numeric" in shape:
            raw["numeric"] = read_features(input_path, trained.feature_names or [])
        if "categorical" in shape:
            names = trained.categorical_names or []
            missing = [c for c in names if c not in frame.columns]
            if missing:
                raise DataError(f"{input_path}: missing categorical column(s) {missing}")
            raw["categorical"] = frame[names].to_numpy(dtype=object)
        for block in sorted(set(shape) - {"numeric", "categorical"}):
            if block.endswith("_present"):
                continue
            if block not in frame.columns:  # e.g. a text block reads the column of its name
                raise DataError(
                    f"{input_path}: the model reads an input block {block!r}; give it as a "
                    f"column named {block!r} (text), columns: {', '.join(map(str, frame.columns))}"
                )
            raw[block] = frame[block].astype(str).tolist()
    elif trained.feature_names is not None:
        raw = read_features(input_path, trained.feature_names)
    else:
        width = int(np.prod(shape))
        frame = read_frame(input_path)
        if frame.shape[1] != width:
            raise DataError(
                f"{input_path}: the model takes {width} input columns "
                f"(shape {list(shape)} flattened), found {frame.shape[1]}"
            )
        features = read_features(input_path, [str(c) for c in frame.columns])
        raw = features.reshape(-1, *shape)
    inputs = trained.preprocess(raw)
    columns = predict_arrays(trained.model, trained.tasks, inputs)
    write_frame(pd.DataFrame(columns), output_path)
    return len(next(iter(columns.values())))
