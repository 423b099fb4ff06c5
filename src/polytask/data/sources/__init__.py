"""Datasets a run configuration can name: built-in sources (nothing is downloaded) and ``file``.

Every builder takes keyword-only arguments, among them ``seed`` (passed by polytask: the
registry's ``provided``), and returns a ``MultiLabelTable``. Builders register themselves in
``DATASETS`` (``polytask.data.sources.registry``) with ``@DATASETS.register(name)``; importing
this package imports every one of them.

Example:
    >>> from polytask.data.sources import DATASETS
    >>> table = DATASETS.get("mmoe-synthetic")(seed=0, num_samples=100)
    >>> table.inputs.shape, [t.name for t in table.tasks]
    ((100, 100), ['t1', 't2'])
"""

from __future__ import annotations

from polytask.data.sources import (
    celeba,
    dense_folders,
    dense_shapes,
    digits,
    file,
    mnist,
    modalities,
    recsys,
    river_data,
    synthetic,
)
from polytask.data.sources.registry import DATASETS, load_dataset

__all__ = [
    "DATASETS",
    "celeba",
    "dense_folders",
    "dense_shapes",
    "digits",
    "file",
    "load_dataset",
    "mnist",
    "modalities",
    "recsys",
    "river_data",
    "synthetic",
]
