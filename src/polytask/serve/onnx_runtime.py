"""Run an exported model without torch: ``onnxruntime`` and numpy, nothing else.

``polytask export`` writes ``model.onnx`` and, beside it, ``model.preprocess.json``
(``PREPROCESS_FORMAT``): the preprocessing that does not live in the graph (categorical
vocabularies, the text tokenizer), the graph's inputs and outputs, and the tasks. The graph
itself standardises numeric features, normalises images and scales waveforms, runs the model and
decodes every task (probabilities, labels, values in original units).

``OnnxPredictor`` applies that JSON to raw input columns and returns the same columns as
``polytask.serve.predict.predict_arrays``. This module imports only numpy, onnxruntime, the
standard library and ``polytask.errors`` (itself standard library only), so it runs where torch
is not installed.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from polytask.errors import DataError, ExportError
from polytask.serve.onnx_tokenizer import SubwordTokenizer

#: the ``format`` of the preprocessing JSON this runtime reads (a new major version is refused)
PREPROCESS_FORMAT = "polytask-onnx-preprocess/1"
PRESENT_SUFFIX = "_present"
#: the graph input of a model whose input is one tensor (not named blocks)
PLAIN_INPUT = "input"


def preprocess_path_for(model_path: str | Path) -> Path:
    """The preprocessing JSON beside ``model_path``: ``model.onnx`` → ``model.preprocess.json``."""
    model_path = Path(model_path)
    return model_path.with_name(f"{model_path.stem}.preprocess.json")


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes (hex)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class TaskInfo:
    """One task of an exported model: its kind, its classes (indices; binary: ``[0, 1]``), the
    graph output holding its decoded prediction and the prediction columns it gives."""

    name: str
    kind: str
    num_classes: int
    classes: list[int] | None
    output: str
    columns: list[str]


@dataclass(frozen=True)
class InputColumn:
    """One raw input column a request gives: its name, dtype (``float64`` numbers, ``string``
    categories or text, ``float32`` tensors of ``shape`` per row, ``bool`` presence flags),
    whether it is categorical, and whether it may be left out (a missing optional modality)."""

    name: str
    dtype: str
    shape: list[int]
    categorical: bool = False
    optional: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dtype": self.dtype,
            "shape": self.shape,
            "categorical": self.categorical,
            "optional": self.optional,
        }


#: the per-pixel task kinds (``polytask.dense_tasks.DENSE_KINDS``; this module does not import
#: torch, so it names them itself)
DENSE_KINDS: tuple[str, ...] = ("segmentation", "depth", "normals")
#: the kinds whose prediction is a value, not probabilities
VALUE_KINDS: tuple[str, ...] = ("regression", "depth", "normals")


def dense_column(kind: str, values: np.ndarray) -> np.ndarray:
    """A dense task's one prediction column from its decoded maps: the class of each pixel
    ``[rows, height, width]`` (segmentation, from probabilities ``[rows, classes, height,
    width]``), the depth ``[rows, height, width]`` or the unit normals ``[rows, 3, height,
    width]``.

    Example:
        >>> dense_column("depth", np.ones((2, 1, 4, 5))).shape
        (2, 4, 5)
    """
    if kind == "segmentation":
        return values.argmax(axis=1)
    if kind == "depth":
        return values[:, 0]
    return values


def task_columns(task: TaskInfo, outputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One task's prediction columns from the graph's outputs (``OnnxPredictor.run``)."""
    values = outputs[task.output]
    if task.kind in ("multiclass", "segmentation"):  # the graph's own argmax
        return {task.name: outputs[f"{task.output}.label"]}
    if task.kind in DENSE_KINDS:
        return {task.name: dense_column(task.kind, values)}
    if values.ndim == 1:
        return {task.name: values}
    return {column: values[:, i] for i, column in enumerate(task.columns)}


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


class OnnxPredictor:
    """An exported polytask model: raw input columns in, one column per task out.

    Args:
        model_path: the ``.onnx`` file written by ``polytask export``; its preprocessing JSON
            (``<stem>.preprocess.json``) must be beside it.
        threads: intra-op threads of the onnxruntime session (``None``: onnxruntime's default).

    ``DataError`` (one line naming the column and row) for input it cannot use; ``ExportError``
    for a model file or JSON that is not a polytask export of a format it reads.
    """

    def __init__(self, model_path: str | Path, *, threads: int | None = None) -> None:
        import onnxruntime as ort

        self.model_path = Path(model_path)
        self.preprocess_path = preprocess_path_for(self.model_path)
        if not self.model_path.is_file():
            raise ExportError(f"{self.model_path}: no such ONNX model file")
        if not self.preprocess_path.is_file():
            raise ExportError(
                f"{self.preprocess_path}: missing; export the model with `polytask export`"
            )
        try:
            spec = json.loads(self.preprocess_path.read_text())
        except (OSError, ValueError) as exc:
            raise ExportError(f"{self.preprocess_path}: not readable JSON ({exc})") from None
        if not isinstance(spec, dict) or spec.get("format") != PREPROCESS_FORMAT:
            found = spec.get("format") if isinstance(spec, dict) else None
            raise ExportError(
                f"{self.preprocess_path}: format {found!r}, this runtime reads {PREPROCESS_FORMAT}"
            )
        self.spec = spec
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = int(threads)
        self.session = ort.InferenceSession(
            str(self.model_path), options, providers=["CPUExecutionProvider"]
        )
        self._inputs: list[dict[str, Any]] = list(spec["inputs"])
        self._tokenizers = {
            entry["name"]: SubwordTokenizer(entry["tokenizer"], max_length=entry["max_length"])
            for entry in self._inputs
            if entry["source"] == "text"
        }
        self._vocab_index = {
            entry["name"]: [{v: i + 1 for i, v in enumerate(vocab)} for vocab in entry["vocab"]]
            for entry in self._inputs
            if entry["source"] == "categorical"
        }
        self._graph_inputs = {i.name for i in self.session.get_inputs()}
        self.tasks = [TaskInfo(**t) for t in spec["tasks"]]

    # ------------------------------------------------------------------ what it is
    @property
    def metadata(self) -> dict[str, Any]:
        """The model's description: file, SHA-256, opset, exporter, quantization, run."""
        return dict(self.spec["model"])

    @property
    def input_schema(self) -> list[InputColumn]:
        """The raw input columns, in order (see ``InputColumn``)."""
        return [InputColumn(**c) for c in self.spec["columns"]]

    @property
    def output_columns(self) -> list[str]:
        """The names of ``predict``'s columns, task by task."""
        return [c for t in self.tasks for c in t.columns]

    # ------------------------------------------------------------------ predicting
    def run(self, columns: Mapping[str, Sequence[Any] | np.ndarray]) -> dict[str, np.ndarray]:
        """The graph's raw outputs by name (each task's decoded prediction, and ``<task>.label``
        for multiclass tasks) for the rows of ``columns``."""
        feeds = self.feeds(columns)
        names = [o.name for o in self.session.get_outputs()]
        return dict(zip(names, self.session.run(names, feeds), strict=True))

    def predict(self, columns: Mapping[str, Sequence[Any] | np.ndarray]) -> dict[str, np.ndarray]:
        """One column per task, as ``polytask predict`` writes them: the class index
        (multiclass), the probability of 1 (binary), ``task_i`` per label (multilabel) or per
        output (regression with several outputs), values in the targets' original units; a
        map per row for the dense kinds (``dense_column``)."""
        outputs = self.run(columns)
        predictions: dict[str, np.ndarray] = {}
        for task in self.tasks:
            predictions.update(task_columns(task, outputs))
        return predictions

    def probabilities(
        self, columns: Mapping[str, Sequence[Any] | np.ndarray]
    ) -> dict[str, np.ndarray]:
        """Per classification task, the probabilities: ``[rows, classes]`` (multiclass),
        ``[rows]`` of the positive class (binary), ``[rows, labels]`` (multilabel),
        ``[rows, classes, height, width]`` (segmentation)."""
        outputs = self.run(columns)
        return {t.name: outputs[t.output] for t in self.tasks if t.kind not in VALUE_KINDS}

    # ------------------------------------------------------------------ preprocessing
    def feeds(self, columns: Mapping[str, Sequence[Any] | np.ndarray]) -> dict[str, np.ndarray]:
        """The graph's input arrays for the rows of ``columns`` (raw values, by column name)."""
        rows = _row_count(columns)
        feeds: dict[str, np.ndarray] = {}
        present: dict[str, np.ndarray] = {}
        for entry in self._inputs:
            source, name = entry["source"], entry["name"]
            if source == "present":
                continue
            if source == "numeric":
                feeds[name] = _numeric(columns, entry["columns"], rows)
            elif source == "categorical":
                feeds[name] = self._codes(columns, entry, rows)
            elif source == "text":
                feeds[name], present[name] = self._token_ids(columns, entry, rows)
            else:
                feeds[name], present[name] = _tensor(columns, entry, rows)
        for entry in self._inputs:
            if entry["source"] == "present":
                feeds[entry["name"]] = _presence(columns, entry, present.get(entry["block"]), rows)
        return {k: v for k, v in feeds.items() if k in self._graph_inputs}

    def _codes(self, columns: Mapping[str, Any], entry: dict[str, Any], rows: int) -> np.ndarray:
        codes = np.zeros((rows, len(entry["columns"])), dtype=np.int64)
        for j, (column, index) in enumerate(
            zip(entry["columns"], self._vocab_index[entry["name"]], strict=True)
        ):
            values = _column(columns, column, rows)
            codes[:, j] = [0 if _missing(v) else index.get(str(v), 0) for v in values]
        return codes

    def _token_ids(
        self, columns: Mapping[str, Any], entry: dict[str, Any], rows: int
    ) -> tuple[np.ndarray, np.ndarray]:
        column = entry["column"]
        if column not in columns and entry.get("optional"):
            values: Sequence[Any] = [None] * rows
        else:
            values = _column(columns, column, rows)
        tokenizer = self._tokenizers[entry["name"]]
        ids = np.zeros((rows, entry["max_length"]), dtype=np.int64)
        given = np.ones(rows, dtype=bool)
        for i, text in enumerate(values):
            if _missing(text):
                given[i] = False
                continue
            if not isinstance(text, str):
                raise DataError(f"column {column!r}, row {i}: text expected, found {text!r}")
            ids[i] = tokenizer.encode(text)
        return ids, given


def _row_count(columns: Mapping[str, Any]) -> int:
    if not columns:
        raise DataError("no input columns given")
    lengths = {name: len(values) for name, values in columns.items()}
    if len(set(lengths.values())) > 1:
        shown = ", ".join(f"{k}: {n}" for k, n in lengths.items())
        raise DataError(f"input columns have different numbers of rows ({shown})")
    return next(iter(lengths.values()))


def _column(columns: Mapping[str, Any], name: str, rows: int) -> Any:
    if name not in columns:
        raise DataError(f"missing input column {name!r}; given: {', '.join(map(str, columns))}")
    return columns[name]


def _numeric(columns: Mapping[str, Any], names: list[str], rows: int) -> np.ndarray:
    out = np.empty((rows, len(names)), dtype=np.float32)
    for j, name in enumerate(names):
        values = _column(columns, name, rows)
        try:
            out[:, j] = np.asarray(values, dtype=np.float64)
        except (TypeError, ValueError):
            bad = next(i for i, v in enumerate(values) if not _is_number(v))
            raise DataError(
                f"column {name!r}, row {bad}: a number expected, found {values[bad]!r}"
            ) from None
    return out


def _is_number(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def _tensor(
    columns: Mapping[str, Any], entry: dict[str, Any], rows: int
) -> tuple[np.ndarray, np.ndarray]:
    """A float32 block ``[rows, *shape]`` (a row given flat is reshaped) and which rows gave it
    (a missing optional block, or ``None`` in a row, is zeros)."""
    name, shape = entry["column"], list(entry["shape"])
    out = np.zeros((rows, *shape), dtype=np.float32)
    given = np.ones(rows, dtype=bool)
    if name not in columns and entry.get("optional"):
        return out, np.zeros(rows, dtype=bool)
    values = _column(columns, name, rows)
    if isinstance(values, np.ndarray) and values.dtype != object:
        array = values.astype(np.float32, copy=False)
        if array.size != out.size:
            raise DataError(
                f"column {name!r}: each row must hold {int(np.prod(shape))} values "
                f"(shape {shape}), found array of shape {list(values.shape)}"
            )
        return array.reshape(out.shape), given
    for i, value in enumerate(values):
        if value is None:
            given[i] = False
            continue
        row = np.asarray(value, dtype=np.float32)
        if row.size != int(np.prod(shape)):
            raise DataError(
                f"column {name!r}, row {i}: {int(np.prod(shape))} values expected (shape "
                f"{shape}), found {row.size}"
            )
        out[i] = row.reshape(shape)
    return out, given


def _presence(
    columns: Mapping[str, Any], entry: dict[str, Any], given: np.ndarray | None, rows: int
) -> np.ndarray:
    """The ``<block>_present`` flags (float32, as the graph reads them): the column when given;
    else 0 for a row that lacks the block (``None``, or the column left out) and -1 for one that
    gives it (the model's own rule then decides: a block of all zeros is missing)."""
    name = entry["column"]
    if name in columns:
        values = np.asarray(columns[name])
        if values.shape != (rows,):
            raise DataError(f"column {name!r}: one flag per row expected, shape {values.shape}")
        try:
            return values.astype(np.float32)
        except (TypeError, ValueError):
            raise DataError(f"column {name!r}: true/false flags expected") from None
    if given is None:
        return np.full(rows, -1.0, dtype=np.float32)
    return np.where(given, np.float32(-1.0), np.float32(0.0)).astype(np.float32)


__all__ = [
    "PREPROCESS_FORMAT",
    "InputColumn",
    "OnnxPredictor",
    "TaskInfo",
    "file_sha256",
    "preprocess_path_for",
]
