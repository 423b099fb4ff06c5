"""Data: multi-task tables, one path from one or several of them to split tensors, batches,
samplers for several datasets, users' CSV/Parquet files, and the datasets a configuration can
name (``DATASETS``).

Modules: ``table`` (``MultiLabelTable``: raw arrays with several label columns), ``bundle``
(``build_bundle``: tables → ``DataBundle``), ``batches`` (``Batch``, ``MultiLabelDataset``,
``BatchLoader``), ``samplers`` and ``mixing`` (several datasets, one model), ``preprocess``
(preprocessors fitted on train), ``files``, ``text``, ``images``, ``audio`` and ``sources``.
"""

from __future__ import annotations

from polytask.data.batches import Batch, BatchLoader, MultiLabelDataset, target_tensor
from polytask.data.bundle import DataBundle, build_bundle, split_indices
from polytask.data.files import read_features, read_frame, table_from_frame, write_frame
from polytask.data.preprocess import (
    PREPROCESSORS,
    CategoryVocabulary,
    Inputs,
    Standardizer,
    inputs_to,
    take_inputs,
)
from polytask.data.sources import DATASETS
from polytask.data.table import SPLITS, MultiLabelTable

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
