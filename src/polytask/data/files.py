"""Users' own data: CSV and Parquet files to ``MultiLabelTable``s and feature matrices.

File conventions:

* the suffix decides the format: ``.csv``, ``.csv.gz``, ``.parquet`` or ``.pq``;
* an empty cell is a missing label (``-1``, the library's code for a missing label, is
  accepted too); multiclass labels are integers ``0..C-1``, binary and multilabel labels 0/1;
* rows in messages are *data rows counted from 1*, the header excluded (data row 1 is line 2
  of a CSV file);
* column names are unique (a name given twice is an error, not pandas' ``a.1``), and a number
  that float32 cannot hold (beyond ±3.4e38) is an error, not an infinity.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from polytask.data.table import SPLITS, MultiLabelTable
from polytask.dense_tasks import DENSE_KINDS
from polytask.errors import ConfigError, DataError
from polytask.tasks import TASK_KINDS, TaskSpec

FORMATS: dict[str, str] = {".csv": "csv", ".csv.gz": "csv", ".parquet": "parquet", ".pq": "parquet"}
TASK_KEYS = ("name", "kind", "num_classes", "column", "columns", "loss", "metrics", "weight")


def file_format(path: Path) -> str:
    """``"csv"`` or ``"parquet"`` from the file name's suffix; ``DataError`` otherwise."""
    name = Path(path).name.lower()
    for suffix, kind in FORMATS.items():
        if name.endswith(suffix):
            return kind
    raise DataError(f"{path}: unknown file type; use one of {', '.join(FORMATS)}")


def read_frame(path: Path) -> pd.DataFrame:
    """The table in a CSV or Parquet file; ``DataError`` naming the file when it is missing,
    of an unknown type, unreadable, or has a column name twice."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    kind = file_format(path)
    try:
        _check_unique_columns(path, _column_names(path, kind))
        return pd.read_csv(path) if kind == "csv" else pd.read_parquet(path)
    except ImportError as exc:
        raise DataError(f"{path}: reading {kind} files needs pyarrow: {exc}") from exc
    except (OSError, ValueError) as exc:  # parser, encoding, empty-file and Arrow errors
        raise DataError(f"{path}: cannot read it as {kind}: {exc}") from exc


def _column_names(path: Path, kind: str) -> list[str]:
    """The column names as the file spells them (pandas renames a repeated ``a`` to ``a.1``)."""
    if kind == "parquet":
        import pyarrow.parquet as pq

        return [str(name) for name in pq.read_schema(path).names]
    header = pd.read_csv(path, header=None, nrows=1, dtype=str, keep_default_na=False)
    return [str(name) for name in header.iloc[0].tolist()] if len(header) else []


def _check_unique_columns(path: Path, names: Sequence[str]) -> None:
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        where = "; ".join(
            f"{n!r} is columns {', '.join(str(i + 1) for i, m in enumerate(names) if m == n)}"
            for n in repeated
        )
        raise DataError(
            f"{path}: duplicate column name(s) {', '.join(map(repr, repeated))} ({where}); "
            "every column needs its own name"
        )


def file_fingerprint(path: Path) -> dict[str, Any]:
    """What identifies a data file's content: ``{"file", "size", "sha256"}`` (recorded by a
    run, so that evaluating or resuming it can tell when the file changed)."""
    path = Path(path)
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return {"file": str(path), "size": path.stat().st_size, "sha256": digest.hexdigest()}


def write_frame(frame: pd.DataFrame, path: Path) -> None:
    """Write ``frame`` (without its index) as CSV or Parquet by suffix, atomically: into a
    temporary file in the same folder, then renamed over ``path``."""
    path = Path(path)
    kind = file_format(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        if kind == "csv":
            compression = "gzip" if path.name.lower().endswith(".gz") else None
            frame.to_csv(temporary, index=False, compression=compression)
        else:
            frame.to_parquet(temporary, index=False)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _row(position: int) -> str:
    return f"data row {position + 1}"


#: the largest magnitude a float32 holds; beyond it a cast gives infinity
FLOAT32_MAX = float(np.finfo(np.float32).max)


def _numbers(frame: pd.DataFrame, column: str, source: str, hint: str) -> np.ndarray:
    """Column ``column`` as float64 (NaN where empty); ``DataError`` at the first cell that is
    not a number (with ``hint`` appended) or a finite number beyond float32's range."""
    values = frame[column]
    numeric = pd.to_numeric(values, errors="coerce")
    bad = np.flatnonzero((numeric.isna() & values.notna()).to_numpy())
    if len(bad):
        raise DataError(
            f"{source}: {_row(int(bad[0]))}, column {column!r}: {values.iloc[bad[0]]!r} is not a "
            f"number; {hint}"
        )
    array = numeric.to_numpy(dtype=np.float64, na_value=np.nan)
    with np.errstate(invalid="ignore"):
        huge = np.flatnonzero(np.isfinite(array) & (np.abs(array) > FLOAT32_MAX))
    if len(huge):
        raise DataError(
            f"{source}: {_row(int(huge[0]))}, column {column!r}: {array[huge[0]]:g} is beyond "
            f"the float32 range (±{FLOAT32_MAX:.4g}); rescale the column"
        )
    return array


def _feature_matrix(frame: pd.DataFrame, columns: Sequence[str], source: str) -> np.ndarray:
    """float32 ``[N, F]`` of ``columns``; ``DataError`` for a non-numeric column or an empty,
    NaN or infinite cell."""
    hint = "feature columns must be numeric: list it under `categorical`, encode it or drop it"
    x = np.empty((len(frame), len(columns)), dtype=np.float32)
    for j, column in enumerate(columns):
        x[:, j] = _numbers(frame, column, source, hint)
    bad = np.argwhere(~np.isfinite(x))
    if len(bad):
        i, j = (int(v) for v in bad[0])
        raise DataError(
            f"{source}: {_row(i)}, feature column {columns[j]!r}: empty, NaN or infinite value"
        )
    return x


def _labels(frame: pd.DataFrame, task: TaskSpec, columns: Sequence[str], source: str) -> np.ndarray:
    """One task's labels from its columns, encoded as ``polytask.tasks`` expects."""
    hint = "empty cells are missing labels"
    values = np.stack([_numbers(frame, c, source, hint) for c in columns], axis=1)  # [N, k]
    missing = np.isnan(values)
    if task.kind == "regression":
        problem, bad = "must be finite", np.isinf(values)
    elif task.kind == "multiclass":
        missing |= values == -1
        in_range = (values == np.round(values)) & (values >= 0) & (values < task.num_classes)
        problem = f"must be an integer class 0..{task.num_classes - 1}"
        bad = ~missing & ~in_range
    else:
        missing |= values == -1
        problem, bad = "must be 0 or 1", ~missing & ~np.isin(values, (0.0, 1.0))
    if bad.any():
        i, j = (int(v) for v in np.argwhere(bad)[0])
        raise DataError(
            f"{source}: {_row(i)}, column {columns[j]!r}: label {values[i, j]:g} of task "
            f"{task.name!r} {problem} ({hint})"
        )
    if task.kind == "multiclass":
        return np.where(missing, -1, values).astype(np.int64)[:, 0]
    out = np.where(missing, np.nan, values).astype(np.float32)
    return out if task.kind == "multilabel" or len(columns) > 1 else out[:, 0]


def _split_codes(frame: pd.DataFrame, column: str, source: str) -> np.ndarray:
    codes = {name: code for code, name in enumerate(SPLITS)}
    text = frame[column].astype("string").str.strip().str.lower()
    split = text.map(codes).to_numpy(dtype=np.float64, na_value=np.nan)
    bad = np.flatnonzero(np.isnan(split))
    if len(bad):
        raise DataError(
            f"{source}: {_row(int(bad[0]))}, split column {column!r}: "
            f"{frame[column].iloc[bad[0]]!r} is not one of {', '.join(SPLITS)}"
        )
    return split.astype(np.int8)


def table_from_frame(
    frame: pd.DataFrame,
    *,
    tasks: list[TaskSpec],
    label_columns: Mapping[str, Sequence[str]],
    feature_columns: Sequence[str] | None,
    source: str,
    split_column: str | None = None,
    categorical_columns: Sequence[str] | None = None,
) -> MultiLabelTable:
    """A validated table: ``label_columns[task]`` (default: the task's name) hold each task's
    labels (several columns for multilabel and vector regression), ``feature_columns`` (default:
    every other column) the numeric inputs, ``categorical_columns`` categorical inputs (any
    values; a vocabulary is built on the training split, unknown values map to a reserved code),
    and ``split_column`` an optional fixed train/val/test split."""
    categorical = list(categorical_columns or [])
    available = [str(c) for c in frame.columns]
    columns = {t.name: list(label_columns.get(t.name, [t.name])) for t in tasks}
    wanted = [(c, f"labels of task {name!r}") for name, cols in columns.items() for c in cols]
    if split_column is not None:
        wanted.append((split_column, "split column"))
    if feature_columns is not None:
        wanted.extend((c, "feature column") for c in feature_columns)
    wanted.extend((c, "categorical column") for c in categorical)
    for column, role in wanted:
        if column not in frame.columns:
            raise DataError(
                f"{source}: no column {column!r} ({role}); columns: {', '.join(available)}"
            )
    for task in tasks:
        needed = 1 if task.kind in ("binary", "multiclass") else task.num_classes
        if len(columns[task.name]) != needed:
            raise ConfigError(
                f"{source}: task {task.name!r}: a {task.kind} task with num_classes "
                f"{task.num_classes} takes {needed} label column(s), found {columns[task.name]}"
            )
    used = {c for cols in columns.values() for c in cols}
    if split_column is not None:
        used.add(split_column)
    overlap = sorted(used.intersection(categorical))
    if overlap:
        raise ConfigError(f"{source}: column(s) {overlap} are both categorical and labels/split")
    used.update(categorical)
    if feature_columns is None:
        features = [c for c in frame.columns if c not in used]
    else:
        features = list(feature_columns)
        overlap = sorted(used.intersection(features))
        if overlap:
            raise ConfigError(f"{source}: column(s) {overlap} are both features and labels/split")
    if not features and not categorical:
        raise DataError(f"{source}: no feature columns left besides labels and split")
    numeric = _feature_matrix(frame, features, source)
    inputs: np.ndarray | dict[str, np.ndarray] = numeric
    if categorical:
        inputs = {"numeric": numeric, "categorical": frame[categorical].to_numpy(dtype=object)}
    table = MultiLabelTable(
        inputs=inputs,
        categorical_names=categorical or None,
        targets={t.name: _labels(frame, t, columns[t.name], source) for t in tasks},
        tasks=list(tasks),
        feature_names=[str(c) for c in features],
        split=None if split_column is None else _split_codes(frame, split_column, source),
        source=source,
    )
    table.validate()
    return table


def read_features(path: Path, feature_names: Sequence[str]) -> np.ndarray:
    """float32 ``[N, F]`` of the columns ``feature_names`` of a CSV/Parquet file (for
    prediction); ``DataError`` naming missing columns, or the row and column of a bad value."""
    frame = read_frame(path)
    missing = [c for c in feature_names if c not in frame.columns]
    if missing:
        raise DataError(
            f"{path}: missing feature column(s) {', '.join(map(repr, missing))} "
            f"(the model needs {len(feature_names)} features)"
        )
    return _feature_matrix(frame, feature_names, str(path))


def tasks_from_dicts(
    entries: Sequence[Mapping[str, Any]], *, source: str
) -> tuple[list[TaskSpec], dict[str, list[str]]]:
    """Task specs and their label columns from YAML-style dicts ``{name, kind, num_classes?,
    column? | columns?, loss?, metrics?, weight?}``. ``column`` defaults to the name;
    ``num_classes`` defaults to 1 (binary) or the number of columns (multilabel, regression) and
    is required for multiclass. ``ConfigError`` names the task."""
    if not entries:
        raise ConfigError(f"{source}: at least one task is needed")
    specs: list[TaskSpec] = []
    columns: dict[str, list[str]] = {}
    for position, entry in enumerate(entries, start=1):
        where = f"{source}: task #{position}"
        if not isinstance(entry, Mapping):
            raise ConfigError(f"{where}: expected a mapping with 'name' and 'kind': {entry!r}")
        name = entry.get("name")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{where}: needs a 'name' (a non-empty string)")
        where = f"{source}: task {name!r}"
        unknown = sorted(set(entry) - set(TASK_KEYS))
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {unknown}; valid: {', '.join(TASK_KEYS)}")
        if name in columns:
            raise ConfigError(f"{where}: defined twice")
        kind = entry.get("kind")
        if kind not in TASK_KINDS:
            valid = ", ".join(k for k in TASK_KINDS if k not in DENSE_KINDS)
            raise ConfigError(f"{where}: 'kind' must be one of {valid}, found {kind!r}")
        if kind in DENSE_KINDS:
            raise ConfigError(
                f"{where}: kind {kind!r} needs per-pixel targets, which a table column cannot "
                "hold; read them from a dense folder (datasets nyuv2, cityscapes)"
            )
        if "column" in entry and "columns" in entry:
            raise ConfigError(f"{where}: give 'column' or 'columns', not both")
        cols = entry["columns"] if "columns" in entry else [entry.get("column", name)]
        if isinstance(cols, str) or not cols or not all(isinstance(c, str) for c in cols):
            raise ConfigError(f"{where}: 'columns' must be a non-empty list of column names")
        num_classes = entry.get("num_classes")
        if num_classes is None:
            if kind == "multiclass":
                raise ConfigError(f"{where}: a multiclass task needs 'num_classes'")
            num_classes = 1 if kind == "binary" else len(cols)
        if not isinstance(num_classes, int) or isinstance(num_classes, bool):
            raise ConfigError(f"{where}: 'num_classes' must be an integer, found {num_classes!r}")
        weight = entry.get("weight", 1.0)
        if not isinstance(weight, int | float) or isinstance(weight, bool):
            raise ConfigError(f"{where}: 'weight' must be a number, found {weight!r}")
        metrics = entry.get("metrics")
        try:
            specs.append(
                TaskSpec(
                    name=name,
                    kind=kind,
                    num_classes=num_classes,
                    loss=entry.get("loss"),
                    metrics=None if metrics is None else tuple(metrics),
                    weight=float(weight),
                )
            )
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None
        columns[name] = list(cols)
    return specs, columns
