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
    build_bundle,
    split_indices,
    target_tensor,
)
from polytask.data.preprocess import (
    PREPROCESSORS,
    CategoryVocabulary,
    Inputs,
    Standardizer,
    inputs_to,
    take_inputs,
)
from polytask.data.sources import DATASETS

__all__ = [
    "DATASETS",
    "PREPROCESSORS",
    "SPLITS",
    "Batch",
    "BatchLoader",
    "CategoryVocabulary",
    "DataBundle",
    "Inputs",
    "MultiLabelDataset",
    "MultiLabelTable",
    "Standardizer",
    "build_bundle",
    "inputs_to",
    "read_features",
    "read_frame",
    "split_indices",
    "table_from_frame",
    "take_inputs",
    "target_tensor",
    "write_frame",
]
