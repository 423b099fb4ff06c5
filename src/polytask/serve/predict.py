"""Batch prediction: a table of inputs in, one column per task out."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from polytask.data.files import file_format, read_features, read_frame, write_frame
from polytask.data.preprocess import Inputs
from polytask.errors import DataError
from polytask.evaluate.inference import decoded_predictions
from polytask.models import MultiTaskModel
from polytask.run.folder import TrainedModel, load_trained
from polytask.serve.onnx_runtime import DENSE_KINDS, dense_column
from polytask.tasks import TaskSpec

if TYPE_CHECKING:
    import pandas as pd


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
    (regression; ``task_i`` per output when there are several); for a dense task one column
    of maps: the class per pixel ``[rows, H, W]``, the depth ``[rows, H, W]`` in original
    units, or the unit normals ``[rows, 3, H, W]``."""
    decoded = decoded_predictions(model, inputs, tasks, batch_size=batch_size, device=device)
    return prediction_columns({name: values.numpy() for name, values in decoded.items()}, tasks)


def prediction_columns(
    decoded: Mapping[str, np.ndarray], tasks: Sequence[TaskSpec]
) -> dict[str, np.ndarray]:
    """``predict_arrays``'s columns from each task's decoded predictions (``TaskSpec.decode``:
    class probabilities, probabilities of 1, values in original units; per-pixel maps for the
    dense kinds, one column each: ``onnx_runtime.dense_column``)."""
    columns: dict[str, np.ndarray] = {}
    for task in tasks:
        values = decoded[task.name]
        if task.kind in DENSE_KINDS:
            columns[task.name] = dense_column(task.kind, values)
        elif task.kind == "multiclass":
            columns[task.name] = values.argmax(axis=-1)
        elif values.ndim == 1:
            columns[task.name] = values
        else:
            for i in range(values.shape[1]):
                columns[f"{task.name}_{i}"] = values[:, i]
    return columns


def check_output(input_path: Path, output_path: Path, *, overwrite: bool = False) -> None:
    """``DataError`` (one line naming ``output_path``) unless predictions may be written there:
    not the input file (by any path to it), not a folder, not an existing file unless
    ``overwrite``, a CSV/Parquet name, and no file where a folder above it should be."""
    input_path, output_path = Path(input_path), Path(output_path)
    if _same_file(input_path, output_path):
        raise DataError(
            f"{output_path}: is the input file {input_path}; write the predictions to another file"
        )
    if output_path.is_dir():
        raise DataError(f"{output_path}: is a folder; give the name of a file to write")
    if output_path.exists() and not overwrite:
        raise DataError(f"{output_path}: exists already; use --overwrite to replace it")
    file_format(output_path)
    for parent in output_path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise DataError(f"{output_path}: cannot write it, {parent} is a file, not a folder")
            break


def _same_file(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)  # hard links
    except OSError:
        return False


def _input_frame(input_path: Path, keep: Sequence[str]) -> pd.DataFrame:
    """The input table, refused when it has no rows or lacks a column to ``keep``."""
    frame = read_frame(input_path)
    if len(frame) == 0:
        raise DataError(f"{input_path}: no rows to predict (the file has only a header)")
    missing = [c for c in keep if c not in frame.columns]
    if missing:
        shown = ", ".join(map(str, frame.columns[:20])) + (", ..." if frame.shape[1] > 20 else "")
        raise DataError(
            f"{input_path}: no column(s) {', '.join(map(repr, missing))} to keep; columns: {shown}"
        )
    return frame


def _raw_inputs(trained: TrainedModel, input_path: Path, frame: pd.DataFrame) -> Any:
    """The model's raw inputs from the rows of ``frame`` (read from ``input_path``): the run's
    feature columns (by name), or, for runs without feature names (images), every column in
    order."""
    shape = trained.input_shape
    if isinstance(shape, dict):  # named blocks: numeric features and categorical columns
        raw: dict[str, Any] = {}
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
        return raw
    if trained.feature_names is not None:
        return read_features(input_path, trained.feature_names)
    width = int(np.prod(shape))
    if frame.shape[1] != width:
        raise DataError(
            f"{input_path}: the model takes {width} input columns "
            f"(shape {list(shape)} flattened), found {frame.shape[1]}"
        )
    features = read_features(input_path, [str(c) for c in frame.columns])
    return features.reshape(-1, *shape)


def predict_file(
    run_dir: Path,
    input_path: Path,
    output_path: Path,
    *,
    checkpoint: str = "best",
    keep: Sequence[str] = (),
    overwrite: bool = False,
) -> int:
    """Predict every task for each row of ``input_path`` (CSV/Parquet) and write one column per
    task to ``output_path``, after the input columns named in ``keep`` (IDs), copied as they
    are; returns the number of rows. Inputs are the run's feature columns (by name), or, for
    runs without feature names (images), every column in order.

    ``DataError``, one line, before anything is computed: ``output_path`` is the input, a folder
    or (without ``overwrite``) an existing file; the input has no rows or lacks a ``keep``
    column. Nothing is written unless every row is predicted; ``output_path`` is replaced
    atomically."""
    import pandas as pd

    input_path, output_path = Path(input_path), Path(output_path)
    keep = list(dict.fromkeys(keep))
    check_output(input_path, output_path, overwrite=overwrite)
    frame = _input_frame(input_path, keep)
    trained = load_trained(run_dir, checkpoint=checkpoint)
    inputs = trained.preprocess(_raw_inputs(trained, input_path, frame))
    columns = predict_arrays(trained.model, trained.tasks, inputs)
    clash = [c for c in keep if c in columns]
    if clash:
        raise DataError(
            f"{input_path}: column(s) {', '.join(map(repr, clash))} to keep have the name of a "
            "prediction column; rename them in the input"
        )
    table = pd.concat(
        [frame[keep].reset_index(drop=True), *_flat_frames(columns)], axis=1, copy=False
    )
    try:
        write_frame(table, output_path)
    except OSError as exc:
        raise DataError(f"{output_path}: cannot write the predictions ({_reason(exc)})") from exc
    return len(table)


def _flat_frames(columns: Mapping[str, np.ndarray]) -> list[pd.DataFrame]:
    """``predict_arrays``' columns as tables: a column per value, and a dense task's map per row
    flattened in row-major order to ``task_0`` … ``task_{n-1}`` (``[H, W]``, or ``[3, H, W]``
    for normals), as image inputs are given flattened."""
    import pandas as pd

    frames: list[pd.DataFrame] = []
    plain: dict[str, np.ndarray] = {}  # consecutive value columns, one table
    for name, values in columns.items():
        if values.ndim == 1:
            plain[name] = values
            continue
        if plain:
            frames.append(pd.DataFrame(plain))
            plain = {}
        flat = values.reshape(len(values), -1)
        frames.append(pd.DataFrame(flat, columns=[f"{name}_{i}" for i in range(flat.shape[1])]))
    if plain:
        frames.append(pd.DataFrame(plain))
    return frames


def _reason(exc: OSError) -> str:
    return exc.strerror or " ".join(str(exc).split()) or type(exc).__name__
