"""A multi-task table: one input, several label columns, in memory.

A built-in source (``polytask.data.sources``) or a user's CSV/Parquet file
(``polytask.data.files``) becomes a ``MultiLabelTable``: raw arrays (or lists, for texts), one
label array per task with missing labels encoded as in ``polytask.tasks``, and optionally a fixed
split. ``polytask.data.bundle.build_bundle`` turns one or several tables into tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from polytask.data.preprocess import Preprocessor
from polytask.errors import DataError
from polytask.tasks import TaskSpec

#: the names of a table's fixed split codes 0, 1 and 2
SPLITS = ("train", "val", "test")


@dataclass
class MultiLabelTable:
    """Raw multi-task data: ``inputs[i]`` with ``targets[task][i]`` (missing labels encoded as in
    ``polytask.tasks``), and optionally a fixed split (0 train, 1 validation, 2 test).

    ``inputs`` is one numeric array (tabular features, images) or a dict of named blocks (e.g.
    ``{"numeric": ..., "categorical": ...}``, or one block per modality). ``preprocessors`` maps
    a block name to a preprocessor fitted on the training rows (``polytask.data.preprocess``);
    by default numeric blocks are standardised and a ``categorical`` block (raw values, any type,
    ``None``/NaN = missing) gets a vocabulary per column (``categorical_names``).

    ``fingerprint`` identifies what the table was read from (JSON-ready): a file's size and
    SHA-256 (``polytask.data.files.file_fingerprint``), or a built-in dataset's name and
    parameters (``polytask.data.sources.load_dataset``).
    """

    inputs: np.ndarray | dict[str, Any]
    targets: dict[str, np.ndarray]
    tasks: list[TaskSpec]
    feature_names: list[str] | None = None
    split: np.ndarray | None = None
    source: str = "dataset"
    categorical_names: list[str] | None = None
    preprocessors: dict[str, Preprocessor] = field(default_factory=dict)
    fingerprint: dict[str, Any] | None = None

    def __len__(self) -> int:
        if isinstance(self.inputs, dict):
            return len(next(iter(self.inputs.values())))
        return len(self.inputs)

    def validate(self) -> None:
        """Raise ``DataError`` naming the source, task and first bad row."""
        n = len(self)
        if n == 0:
            raise DataError(f"{self.source}: no samples")
        for task in self.tasks:
            if task.name not in self.targets:
                raise DataError(f"{self.source}: no labels for task {task.name!r}")
            y = self.targets[task.name]
            if len(y) != n:
                raise DataError(
                    f"{self.source}: task {task.name!r} has {len(y)} labels for {n} samples"
                )
            if task.kind == "multiclass":
                bad = np.flatnonzero((y < -1) | (y >= task.num_classes))
                if len(bad):
                    raise DataError(
                        f"{self.source}: row {int(bad[0])}: label {int(y[bad[0]])} of task "
                        f"{task.name!r} is out of range 0..{task.num_classes - 1} (-1 = missing)"
                    )
            elif task.kind in ("binary", "multilabel"):
                flat = y.reshape(len(y), -1)
                ok = np.isnan(flat) | np.isin(flat, (0.0, 1.0, -1.0))
                bad = np.flatnonzero(~ok.all(axis=1))
                if len(bad):
                    raise DataError(
                        f"{self.source}: row {int(bad[0])}: label of task {task.name!r} must be "
                        f"0 or 1 (empty/NaN/-1 = missing), found {flat[bad[0]].tolist()}"
                    )
            if task.kind == "multilabel" and (y.ndim != 2 or y.shape[1] != task.num_classes):
                raise DataError(
                    f"{self.source}: task {task.name!r} needs {task.num_classes} label columns, "
                    f"found shape {tuple(y.shape)}"
                )
        blocks = self.inputs if isinstance(self.inputs, dict) else {"inputs": self.inputs}
        for name, block in blocks.items():
            if len(block) != n:
                raise DataError(f"{self.source}: input {name!r} has {len(block)} rows for {n}")
            array = np.asarray(block) if not isinstance(block, list) else None
            if array is None or array.dtype.kind not in "fiub":
                continue  # raw values (categories, text) are checked by their preprocessor
            finite = np.isfinite(array.reshape(n, -1)).all(axis=1)
            if not finite.all():
                row = int(np.flatnonzero(~finite)[0])
                raise DataError(
                    f"{self.source}: row {row}: input {name!r} contains NaN or infinity"
                )
        if self.split is not None and len(self.split) != n:
            raise DataError(f"{self.source}: split has {len(self.split)} entries for {n} samples")


def select_tasks(table: MultiLabelTable, names: Sequence[str]) -> MultiLabelTable:
    """``table`` restricted to the tasks ``names`` (in the table's order), in place."""
    keep = set(names)
    table.tasks = [t for t in table.tasks if t.name in keep]
    table.targets = {t.name: table.targets[t.name] for t in table.tasks}
    return table
