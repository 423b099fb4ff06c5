"""Datasets a run configuration can name: built-in sources (nothing is downloaded) and ``file``.

Every builder takes keyword-only arguments, among them ``seed`` (passed by polytask: the
registry's ``provided``), and returns a ``MultiLabelTable``.

Example:
    >>> from polytask.data.sources import DATASETS
    >>> table = DATASETS.get("mmoe-synthetic")(seed=0, num_samples=100)
    >>> table.inputs.shape, [t.name for t in table.tasks]
    ((100, 100), ['t1', 't2'])
"""

from __future__ import annotations

from collections.abc import Callable

from polytask.data.multilabel import MultiLabelTable
from polytask.registry import Registry

DATASETS: Registry[Callable[..., MultiLabelTable]] = Registry("dataset", provided=("seed",))

# the modules register their builders on import
from polytask.data.sources import digits, file, modalities, recsys, river_data, synthetic  # noqa: E402

__all__ = ["DATASETS", "digits", "file", "modalities", "recsys", "river_data", "synthetic"]
