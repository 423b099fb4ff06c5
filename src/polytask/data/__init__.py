"""Data: multi-task tables, splits and batches, users' CSV/Parquet files, and the datasets a
configuration can name (``DATASETS``)."""

from __future__ import annotations

from polytask.data.files import read_features, read_frame, table_from_frame, write_frame
from polytask.data.multilabel import (
    SPLITS,
    Batch,
    BatchLoader,
    DataBundle,
    MultiLabelDataset,
    MultiLabelTable,
    Standardizer,
    build_bundle,
    split_indices,
    target_tensor,
)
from polytask.data.sources import DATASETS

__all__ = [
    "DATASETS",
    "SPLITS",
    "Batch",
    "BatchLoader",
    "DataBundle",
    "MultiLabelDataset",
    "MultiLabelTable",
    "Standardizer",
    "build_bundle",
    "read_features",
    "read_frame",
    "split_indices",
    "table_from_frame",
    "target_tensor",
    "write_frame",
]
