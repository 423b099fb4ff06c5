"""One input, several label columns: tables, splits, standardisation and batches.

A built-in source or a user's CSV/Parquet file becomes a ``MultiLabelTable`` (arrays in memory);
``build_bundle`` splits it into train/validation/test by seed, fits standardisation on the
training split only, and returns a ``DataBundle`` of ``MultiLabelDataset``s. ``BatchLoader``
draws batches by slicing tensors (no per-sample Python work), reproducibly per (seed, epoch).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from polytask.data.preprocess import (
    CategoryVocabulary,
    Inputs,
    Preprocessor,
    Standardizer,
    input_spec,
    inputs_to,
    num_rows,
    take_inputs,
)
from polytask.errors import DataError
from polytask.tasks import TaskSpec

Batch = tuple[Inputs, dict[str, Tensor]]
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
    """

    inputs: np.ndarray | dict[str, Any]
    targets: dict[str, np.ndarray]
    tasks: list[TaskSpec]
    feature_names: list[str] | None = None
    split: np.ndarray | None = None
    source: str = "dataset"
    categorical_names: list[str] | None = None
    preprocessors: dict[str, Preprocessor] = field(default_factory=dict)

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


def target_tensor(task: TaskSpec, values: np.ndarray) -> Tensor:
    """Labels as the tensor type the task's loss expects (int64 classes, float32 otherwise)."""
    if task.kind == "multiclass":
        return torch.as_tensor(np.asarray(values), dtype=torch.int64)
    y = torch.as_tensor(np.asarray(values, dtype=np.float32))
    if task.kind in ("binary", "multilabel"):
        y = torch.where(y < 0, torch.full_like(y, float("nan")), y)
    return y


class MultiLabelDataset(Dataset[tuple[Inputs, dict[str, Tensor]]]):
    """In-memory tensors: ``inputs`` ``[N, ...]`` (or a dict of them) and one label tensor per
    task."""

    def __init__(self, inputs: Inputs, targets: dict[str, Tensor]) -> None:
        self.inputs = inputs
        self.targets = targets

    def __len__(self) -> int:
        return num_rows(self.inputs)

    def __getitem__(self, index: int) -> tuple[Inputs, dict[str, Tensor]]:
        return self.take(torch.as_tensor(index))

    def take(self, index: Tensor) -> Batch:
        """A batch of the rows in ``index`` (one gather per tensor)."""
        return take_inputs(self.inputs, index), {t: y[index] for t, y in self.targets.items()}

    @property
    def device(self) -> torch.device:
        first = self.inputs if isinstance(self.inputs, Tensor) else next(iter(self.inputs.values()))
        return first.device

    def to(self, device: torch.device | str) -> MultiLabelDataset:
        """The same dataset with every tensor on ``device`` (in-memory data trains fastest when
        it lives where the model does)."""
        return MultiLabelDataset(
            inputs_to(self.inputs, device), {t: y.to(device) for t, y in self.targets.items()}
        )

    def select_tasks(self, names: Sequence[str]) -> MultiLabelDataset:
        """The same samples with only the labels of ``names``."""
        return MultiLabelDataset(self.inputs, {n: self.targets[n] for n in names})


@dataclass
class DataBundle:
    """Train/validation/test datasets with everything needed to preprocess new inputs.

    ``input_shape`` is what encoders are built from: the per-sample shape of a tensor input, or a
    dict describing each block of a dict input (``polytask.data.preprocess.input_spec``).
    ``preprocessors`` holds the fitted preprocessors by block name (``""`` for a tensor input).
    """

    tasks: list[TaskSpec]
    train: MultiLabelDataset
    val: MultiLabelDataset
    test: MultiLabelDataset
    input_shape: Any
    feature_names: list[str] | None = None
    preprocessors: dict[str, Preprocessor] = field(default_factory=dict)
    categorical_names: list[str] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def preprocess(self, raw: Any) -> Inputs:
        """Apply the fitted preprocessing to new raw inputs (same layout as the table's)."""
        return apply_preprocessors(raw, self.preprocessors)


def apply_preprocessors(raw: Any, preprocessors: dict[str, Preprocessor]) -> Inputs:
    """Raw inputs (an array, or a dict of blocks) → tensors, through fitted preprocessors."""
    if not isinstance(raw, dict):
        pre = preprocessors.get("")
        if pre is not None:
            return pre.transform(raw)
        return torch.as_tensor(np.asarray(raw, dtype=np.float32))
    out: dict[str, Tensor] = {}
    for key, block in raw.items():
        pre = preprocessors.get(key)
        if pre is not None:
            out[key] = pre.transform(block)
        else:
            out[key] = torch.as_tensor(np.asarray(block, dtype=np.float32))
    return out


def _default_preprocessor(
    key: str, block: Any, *, standardize: bool, categorical_names: list[str] | None
) -> Preprocessor | None:
    if key == "categorical":
        return CategoryVocabulary(categorical_names or [])
    array = np.asarray(block) if not isinstance(block, list) else None
    if standardize and array is not None and array.dtype.kind == "f":
        return Standardizer()
    return None


def split_indices(
    n: int, *, val_fraction: float, test_fraction: float, seed: int
) -> dict[str, np.ndarray]:
    """A seeded random partition of ``range(n)`` into train/val/test index arrays."""
    if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise DataError(
            f"split fractions val={val_fraction}, test={test_fraction} must be in [0, 1) and sum "
            "to less than 1"
        )
    perm = np.random.default_rng(seed).permutation(n)
    n_test = round(n * test_fraction)
    n_val = round(n * val_fraction)
    return {
        "test": np.sort(perm[:n_test]),
        "val": np.sort(perm[n_test : n_test + n_val]),
        "train": np.sort(perm[n_test + n_val :]),
    }


def build_bundle(
    table: MultiLabelTable,
    *,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 0,
    standardize: bool = True,
) -> DataBundle:
    """Validate ``table``, split it (its fixed split if it has one, else by ``seed``), fit
    input and regression-target standardisation on the training split, and wrap tensors."""
    table.validate()
    if table.split is not None:
        parts = {name: np.flatnonzero(table.split == code) for code, name in enumerate(SPLITS)}
    else:
        parts = split_indices(
            len(table), val_fraction=val_fraction, test_fraction=test_fraction, seed=seed
        )
    if len(parts["train"]) == 0:
        raise DataError(f"{table.source}: the training split is empty")
    train_rows = parts["train"]
    preprocessors: dict[str, Preprocessor] = {}
    if isinstance(table.inputs, dict):
        blocks: dict[str, Any] = table.inputs
    else:
        blocks = {"": table.inputs}
    for key, block in blocks.items():
        pre = table.preprocessors.get(key) or _default_preprocessor(
            key, block, standardize=standardize, categorical_names=table.categorical_names
        )
        if pre is not None:
            pre.fit(_rows(block, train_rows))
            preprocessors[key] = pre
    processed = apply_preprocessors(table.inputs, preprocessors)
    targets = {t.name: target_tensor(t, table.targets[t.name]) for t in table.tasks}
    train_idx = torch.as_tensor(train_rows)
    tasks = []
    for task in table.tasks:
        if task.kind == "regression":
            y = targets[task.name][train_idx].reshape(len(train_idx), -1).double()
            finite = torch.isfinite(y)
            filled = torch.where(finite, y, torch.zeros_like(y))
            count = finite.sum(dim=0).clamp_min(1)
            mean = filled.sum(dim=0) / count
            var = (torch.where(finite, y - mean, torch.zeros_like(y)) ** 2).sum(dim=0) / count
            task = task.with_target_scale(mean, var.sqrt())
        tasks.append(task)

    def subset(name: str) -> MultiLabelDataset:
        idx = torch.as_tensor(parts[name])
        inputs = take_inputs(processed, idx)
        if isinstance(inputs, dict):
            inputs = {k: v.contiguous() for k, v in inputs.items()}
        else:
            inputs = inputs.contiguous()
        return MultiLabelDataset(inputs, {t: y[idx] for t, y in targets.items()})

    return DataBundle(
        tasks=tasks,
        train=subset("train"),
        val=subset("val"),
        test=subset("test"),
        input_shape=input_spec(processed, preprocessors),
        feature_names=table.feature_names,
        preprocessors=preprocessors,
        categorical_names=table.categorical_names,
        info={"source": table.source, "sizes": {k: len(v) for k, v in parts.items()}},
    )


def _rows(block: Any, rows: np.ndarray) -> Any:
    """Rows ``rows`` of an array or of a list (e.g. texts)."""
    if isinstance(block, list):
        return [block[i] for i in rows]
    return np.asarray(block)[rows]


class BatchLoader:
    """Mini-batches of an in-memory dataset by tensor slicing.

    The order of epoch ``e`` depends only on ``(seed, e)``, so a run resumed at an epoch
    boundary draws exactly the batches an uninterrupted run would. Under data parallelism
    (``world_size`` processes), global batch ``i`` holds ``world_size · batch_size`` samples and
    process ``rank`` takes its own contiguous share: the union over processes of every batch is
    the batch one process with ``world_size · batch_size`` would draw.
    """

    def __init__(
        self,
        dataset: MultiLabelDataset,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, found {batch_size}")
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside 0..{world_size - 1}")
        self.rank = rank
        self.world_size = world_size
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.dataset)
        size = self.batch_size * self.world_size
        return n // size if self.drop_last else -(-n // size)

    def __iter__(self) -> Iterator[Batch]:
        n = len(self.dataset)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(n, generator=g)
        else:
            order = torch.arange(n)
        order = order.to(self.dataset.device)  # one copy per epoch, not one per batch
        size = self.batch_size * self.world_size
        for i in range(len(self)):
            batch = order[i * size : (i + 1) * size]
            share = -(-len(batch) // self.world_size)
            yield self.dataset.take(batch[self.rank * share : (self.rank + 1) * share])
