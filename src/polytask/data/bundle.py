"""One path from one or several tables to the split, preprocessed tensors of a run.

``build_bundle`` takes the named tables of a run (a single table is a one-entry list) and

1. checks them: each table is valid, the tables share one input layout (one model reads them),
   and a task that several tables have is defined the same way in each;
2. splits each table on its own: its fixed split, or a seeded ``val_fraction`` /
   ``test_fraction`` split;
3. fits one input preprocessing on the union of the training rows (so one model, and
   ``predict``, see one input space);
4. stacks each split table by table (the tasks a table does not have get missing labels, so
   evaluating the validation or test split scores each task on its own tables) and fits each
   regression task's target scale on its labelled training rows.

The ``DataBundle`` it returns records in ``info["datasets"]`` each table's name, tasks, split
sizes and row range in ``train``: the datasets of ``polytask.data.mixing.train_parts``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from polytask.data.batches import Batch, MultiLabelDataset, missing_labels, target_tensor
from polytask.data.preprocess import (
    CategoryVocabulary,
    Inputs,
    Preprocessor,
    Standardizer,
    input_spec,
    take_inputs,
)
from polytask.data.table import SPLITS, MultiLabelTable
from polytask.dense_tasks import depth_target_scale
from polytask.errors import DataError
from polytask.tasks import TaskSpec

#: a table with the name logs, errors and ``info["datasets"]`` give it
NamedTable = tuple[str, MultiLabelTable]


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


def split_rows(
    table: MultiLabelTable, *, val_fraction: float, test_fraction: float, seed: int
) -> dict[str, np.ndarray]:
    """The sorted rows of each split of ``table``: its fixed split, else ``split_indices``."""
    if table.split is not None:
        return {name: np.flatnonzero(table.split == code) for code, name in enumerate(SPLITS)}
    return split_indices(
        len(table), val_fraction=val_fraction, test_fraction=test_fraction, seed=seed
    )


def build_bundle(
    tables: MultiLabelTable | Sequence[NamedTable],
    *,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 0,
    standardize: bool = True,
    weights: Sequence[float | None] | None = None,
) -> DataBundle:
    """The ``DataBundle`` of one table or of several named tables (see the module docstring).

    ``weights`` (one per table, ``None`` for none) are recorded in ``info["datasets"]`` for the
    ``fixed`` sampler. ``DataError`` names the table of a problem.

    Example:
        >>> from polytask.tasks import TaskSpec
        >>> def table(n, task):
        ...     x = np.random.default_rng(n).normal(size=(n, 3))
        ...     return MultiLabelTable(x, {task: x.sum(axis=1)}, [TaskSpec(task, "regression")])
        >>> bundle = build_bundle([("a", table(100, "ta")), ("b", table(20, "tb"))], seed=0)
        >>> len(bundle.train), [t.name for t in bundle.tasks], bundle.info["datasets"][1]["sizes"]
        (84, ['ta', 'tb'], {'train': 14, 'val': 3, 'test': 3})
    """
    named = [(tables.source, tables)] if isinstance(tables, MultiLabelTable) else list(tables)
    tasks = _check_tables(named)
    rows = []
    for name, table in named:
        parts = split_rows(table, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)
        if len(parts["train"]) == 0:
            where = table.source if name == table.source else f"dataset {name!r} ({table.source})"
            raise DataError(f"{where}: the training split is empty")
        rows.append(parts)
    preprocessors = _fit_preprocessors(named, rows, standardize=standardize)
    splits = _stack_splits(named, rows, tasks, preprocessors)
    first = named[0][1]
    return DataBundle(
        tasks=[_with_target_scale(task, splits["train"].targets[task.name]) for task in tasks],
        train=splits["train"],
        val=splits["val"],
        test=splits["test"],
        input_shape=input_spec(splits["train"].inputs, preprocessors),
        feature_names=first.feature_names,
        preprocessors=preprocessors,
        categorical_names=first.categorical_names,
        info=_describe(named, rows, weights),
    )


# ----------------------------------------------------------------------------- checks
def _raw_layout(inputs: Any) -> Any:
    def one(block: Any) -> Any:
        if isinstance(block, list):
            return "list"
        return tuple(np.asarray(block).shape[1:])

    if isinstance(inputs, dict):
        return {k: one(v) for k, v in sorted(inputs.items())}
    return one(inputs)


def _same_task(a: TaskSpec, b: TaskSpec) -> bool:
    def key(t: TaskSpec) -> tuple[Any, ...]:
        return (t.kind, t.num_classes, t.loss_name, t.metric_names, t.weight)

    return key(a) == key(b)


def _check_tables(named: Sequence[NamedTable]) -> list[TaskSpec]:
    """Validate the tables and check that one model can read them; their tasks, in order of
    first appearance."""
    if not named:
        raise DataError("no datasets given")
    names = [name for name, _ in named]
    if len(set(names)) != len(names):
        raise DataError(f"dataset names must be unique, found {names}")
    first_name, first = named[0]
    tasks: dict[str, TaskSpec] = {}
    origin: dict[str, str] = {}
    for name, table in named:
        table.validate()
        if not table.tasks:
            raise DataError(f"dataset {name!r} has no tasks")
        if _raw_layout(table.inputs) != _raw_layout(first.inputs):
            raise DataError(
                f"dataset {name!r}: input layout {_raw_layout(table.inputs)} differs from "
                f"dataset {first_name!r}'s {_raw_layout(first.inputs)}; one model needs one input "
                "layout"
            )
        for attr in ("feature_names", "categorical_names"):
            mine, theirs = getattr(table, attr), getattr(first, attr)
            if mine is not None and theirs is not None and list(mine) != list(theirs):
                raise DataError(
                    f"dataset {name!r}: its {attr.replace('_', ' ')} differ from dataset "
                    f"{first_name!r}'s; one model needs the same input columns in the same order"
                )
        for task in table.tasks:
            known = tasks.setdefault(task.name, task)
            origin.setdefault(task.name, name)
            if not _same_task(known, task):
                raise DataError(
                    f"task {task.name!r} is defined differently in dataset {name!r} "
                    f"({task.kind}, {task.num_classes}) and {origin[task.name]!r} "
                    f"({known.kind}, {known.num_classes})"
                )
    return list(tasks.values())


# ----------------------------------------------------------------------------- preprocessing
def _rows(block: Any, rows: np.ndarray) -> Any:
    """Rows ``rows`` of an array or of a list (e.g. texts)."""
    if isinstance(block, list):
        return [block[i] for i in rows]
    return np.asarray(block)[rows]


def _concat(blocks: Sequence[Any]) -> Any:
    """Blocks (arrays or lists) one after the other; a single block as it is."""
    if len(blocks) == 1:
        return blocks[0]
    if isinstance(blocks[0], list):
        return [v for block in blocks for v in block]
    return np.concatenate([np.asarray(b) for b in blocks])


def _default_preprocessor(
    key: str, block: Any, *, standardize: bool, categorical_names: list[str] | None
) -> Preprocessor | None:
    if key == "categorical":
        return CategoryVocabulary(categorical_names or [])
    array = np.asarray(block) if not isinstance(block, list) else None
    if standardize and array is not None and array.dtype.kind == "f":
        return Standardizer()
    return None


def _fit_preprocessors(
    named: Sequence[NamedTable], rows: Sequence[dict[str, np.ndarray]], *, standardize: bool
) -> dict[str, Preprocessor]:
    """Per input block (``""`` for a tensor input), a preprocessor fitted on the training rows
    of every table: the first table's own for that block, else the default one."""
    first = named[0][1]
    keys = list(first.inputs) if isinstance(first.inputs, dict) else [""]
    preprocessors: dict[str, Preprocessor] = {}
    for key in keys:
        blocks = [t.inputs[key] if key else t.inputs for _, t in named]
        train = _concat([_rows(b, r["train"]) for b, r in zip(blocks, rows, strict=True)])
        own = [t.preprocessors[key] for _, t in named if key in t.preprocessors]
        pre = (
            own[0]
            if own
            else _default_preprocessor(
                key, train, standardize=standardize, categorical_names=first.categorical_names
            )
        )
        if pre is not None:
            pre.fit(train)
            preprocessors[key] = pre
    return preprocessors


# ----------------------------------------------------------------------------- tensors
def _cat(tensors: Sequence[Tensor]) -> Tensor:
    return tensors[0].contiguous() if len(tensors) == 1 else torch.cat(list(tensors))


def _stack_splits(
    named: Sequence[NamedTable],
    rows: Sequence[dict[str, np.ndarray]],
    tasks: Sequence[TaskSpec],
    preprocessors: dict[str, Preprocessor],
) -> dict[str, MultiLabelDataset]:
    """Per split, the preprocessed rows of every table, table after table."""
    own = [
        {t.name: target_tensor(t, table.targets[t.name]) for t in table.tasks} for _, table in named
    ]
    templates = {name: y for labels in reversed(own) for name, y in labels.items()}
    pieces: dict[str, list[Batch]] = {s: [] for s in SPLITS}
    for (_, table), parts, labels in zip(named, rows, own, strict=True):
        inputs = apply_preprocessors(table.inputs, preprocessors)
        targets = {
            t.name: labels[t.name]
            if t.name in labels
            else missing_labels(t, templates[t.name], len(table))
            for t in tasks
        }
        for split in SPLITS:
            index = torch.as_tensor(parts[split])
            pieces[split].append(
                (take_inputs(inputs, index), {t: y[index] for t, y in targets.items()})
            )
    return {split: _stack(parts) for split, parts in pieces.items()}


def _stack(pieces: Sequence[Batch]) -> MultiLabelDataset:
    first = pieces[0][0]
    inputs: Inputs
    if isinstance(first, dict):
        inputs = {k: _cat([p[0][k] for p in pieces]) for k in first}  # type: ignore[index]
    else:
        inputs = _cat([p[0] for p in pieces])  # type: ignore[misc]
    targets = {t: _cat([p[1][t] for p in pieces]) for t in pieces[0][1]}
    return MultiLabelDataset(inputs, targets)


def _with_target_scale(task: TaskSpec, y: Tensor) -> TaskSpec:
    """A regression task with the mean and standard deviation of its labelled training targets,
    a depth task with those of its valid training pixels (other kinds as they are)."""
    if task.kind == "depth":
        return task.with_target_scale(*depth_target_scale(y))
    if task.kind != "regression":
        return task
    y = y.reshape(len(y), -1).double()
    finite = torch.isfinite(y)
    filled = torch.where(finite, y, torch.zeros_like(y))
    count = finite.sum(dim=0).clamp_min(1)
    mean = filled.sum(dim=0) / count
    var = (torch.where(finite, y - mean, torch.zeros_like(y)) ** 2).sum(dim=0) / count
    return task.with_target_scale(mean, var.sqrt())


def _describe(
    named: Sequence[NamedTable],
    rows: Sequence[dict[str, np.ndarray]],
    weights: Sequence[float | None] | None,
) -> dict[str, Any]:
    """``info``: the source, the split sizes, and per table its name, source, tasks, split
    sizes, rows in ``train``, ``weight`` (when given) and ``fingerprint`` (when known)."""
    datasets: list[dict[str, Any]] = []
    start = 0
    for i, ((name, table), parts) in enumerate(zip(named, rows, strict=True)):
        sizes = {s: len(parts[s]) for s in SPLITS}
        entry: dict[str, Any] = {
            "name": name,
            "source": table.source,
            "tasks": [t.name for t in table.tasks],
            "sizes": sizes,
            "train_rows": [start, start + sizes["train"]],
        }
        start += sizes["train"]
        if weights is not None and weights[i] is not None:
            entry["weight"] = weights[i]
        if table.fingerprint is not None:
            entry["fingerprint"] = table.fingerprint
        datasets.append(entry)
    source = named[0][1].source if len(named) == 1 else "+".join(name for name, _ in named)
    totals = {s: sum(d["sizes"][s] for d in datasets) for s in SPLITS}
    return {"source": source, "sizes": totals, "datasets": datasets}
