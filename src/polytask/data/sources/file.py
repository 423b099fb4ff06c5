"""``file``: a user's own CSV or Parquet file as a dataset."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from polytask.data.files import file_fingerprint, read_frame, table_from_frame, tasks_from_dicts
from polytask.data.sources.registry import DATASETS
from polytask.data.table import MultiLabelTable


@DATASETS.register("file", "your own CSV or Parquet file: feature columns and label columns")
def user_file(
    *,
    seed: int,
    path: str,
    tasks: list[dict[str, Any]],
    features: list[str] | None = None,
    categorical: list[str] | None = None,
    split_column: str | None = None,
) -> MultiLabelTable:
    """A CSV (``.csv``, ``.csv.gz``) or Parquet (``.parquet``, ``.pq``) file, one sample per row.

    ``tasks`` lists ``{name, kind, num_classes?, column? | columns?, loss?, metrics?, weight?}``
    (see ``polytask.data.files.tasks_from_dicts``); ``categorical`` lists categorical input
    columns (embedded by the ``tabular`` encoder); ``features`` (numeric inputs) defaults to every
    column that is neither a label, categorical, nor ``split_column`` (values train/val/test;
    without it, the split is drawn by seed). Empty cells are missing labels. ``seed`` is unused:
    the file is the data.
    """
    specs, columns = tasks_from_dicts(tasks, source=path)
    table = table_from_frame(
        read_frame(Path(path)),
        tasks=specs,
        label_columns=columns,
        feature_columns=features,
        source=path,
        split_column=split_column,
        categorical_columns=categorical,
    )
    table.fingerprint = file_fingerprint(Path(path))
    return table
