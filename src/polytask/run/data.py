"""From a validated ``RunConfig`` to the run's data: the split dataset(s), the training batch
source and the evaluation batches. Only this module reads the ``data`` section.

One dataset (``data.dataset`` with its ``params``) is a one-entry list of ``data.datasets``:
both are built by ``dataset_tables`` and split, preprocessed and stacked by
``polytask.data.bundle.build_bundle``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from polytask.config import DatasetEntry, RunConfig
from polytask.data.batches import BatchLoader
from polytask.data.bundle import DataBundle, NamedTable, build_bundle
from polytask.data.mixing import MultiTaskMixer, mixer_from_bundle
from polytask.data.poisson import PoissonBatches
from polytask.data.sources import load_dataset
from polytask.data.streaming import StreamedSplit, StreamingBatches
from polytask.data.table import select_tasks
from polytask.errors import ConfigError, unknown_name
from polytask.run.streamed import streamed_batches, streamed_data
from polytask.tasks import class_balanced_weights


def dataset_entries(config: RunConfig) -> list[DatasetEntry]:
    """``data.datasets``, or ``data.dataset`` with its ``params`` as a one-entry list."""
    if config.data.datasets is not None:
        return list(config.data.datasets)
    assert config.data.dataset is not None  # the schema requires `dataset` or `datasets`
    return [DatasetEntry(dataset=config.data.dataset, params=config.data.params)]


def dataset_tables(
    entries: Sequence[DatasetEntry], *, seed: int, tasks: Sequence[str] | None = None
) -> tuple[list[NamedTable], list[float | None]]:
    """Each entry's table from ``DATASETS``, keeping its ``tasks`` (and only ``tasks`` overall
    when given, e.g. ``data.tasks`` or a single-task baseline: entries left without a task are
    dropped), with the entries' ``weight``. A dataset listed twice is named ``name[i]``.
    ``ConfigError`` names the field of an unknown task."""
    counts: dict[str, int] = {}
    for entry in entries:
        counts[entry.dataset] = counts.get(entry.dataset, 0) + 1
    tables: list[NamedTable] = []
    weights: list[float | None] = []
    offered: list[str] = []
    for i, entry in enumerate(entries):
        table = load_dataset(entry.dataset, entry.params, seed=seed)
        known = [t.name for t in table.tasks]
        names = list(entry.tasks or known)
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ConfigError(
                f"data.datasets.{i}.tasks: {unknown_name('task', unknown, known)} "
                f"(dataset {entry.dataset!r})"
            )
        offered += [n for n in names if n not in offered]
        if tasks is not None:
            names = [n for n in names if n in tasks]
        if names:
            name = entry.dataset if counts[entry.dataset] == 1 else f"{entry.dataset}[{i}]"
            tables.append((name, select_tasks(table, names)))
            weights.append(entry.weight)
    unknown = [n for n in tasks or () if n not in offered]
    if unknown:
        raise ConfigError(f"data.tasks: {unknown_name('task', unknown, offered)}")
    return tables, weights


def build_data(config: RunConfig) -> DataBundle:
    """The run's dataset(s), restricted to ``data.tasks`` when given, split and standardised,
    with the task options of ``data.task_weights`` and ``data.class_balance`` applied. With
    ``data.streaming``, splits read batch by batch (``polytask.run.streamed``)."""
    if config.data.streaming is not None:
        streamed = streamed_data(config)
        apply_task_options(streamed, config)
        return streamed
    tables, weights = dataset_tables(
        dataset_entries(config), seed=config.seed, tasks=config.data.tasks
    )
    bundle = build_bundle(
        tables,
        val_fraction=config.data.val_fraction,
        test_fraction=config.data.test_fraction,
        seed=config.seed,
        standardize=config.data.standardize,
        weights=weights,
    )
    apply_task_options(bundle, config)
    return bundle


def apply_task_options(bundle: DataBundle, config: RunConfig) -> None:
    """Fixed task weights and class-balanced losses from ``data.task_weights`` and
    ``data.class_balance`` (class counts from the training split only)."""
    weights, balance = config.data.task_weights, config.data.class_balance
    names = [t.name for t in bundle.tasks]
    for field_name, mapping in (("data.task_weights", weights), ("data.class_balance", balance)):
        unknown = [n for n in mapping if n not in names]
        if unknown:
            raise ConfigError(f"{field_name}: {unknown_name('task', unknown, names)}")
    for name, weight in weights.items():
        if not weight >= 0:
            raise ConfigError(f"data.task_weights.{name}: must be >= 0, found {weight}")
    tasks = []
    for task in bundle.tasks:
        if task.name in weights:
            task = replace(task, weight=float(weights[task.name]))
        if task.name in balance:
            y = bundle.train.targets[task.name]
            if task.kind == "multiclass":
                counts = torch.bincount(y[y >= 0], minlength=task.num_classes).tolist()
            elif task.kind == "binary":
                labelled = y[torch.isfinite(y)]
                counts = [int((labelled < 0.5).sum()), int((labelled >= 0.5).sum())]
            else:
                raise ConfigError(
                    f"data.class_balance.{task.name}: applies to binary and multiclass tasks, "
                    f"not {task.kind}"
                )
            weights_c = class_balanced_weights(counts, method=balance[task.name])
            task = replace(task, class_weights=weights_c)
        tasks.append(task)
    bundle.tasks = tasks


def move_to_device(bundle: DataBundle, config: RunConfig, device: torch.device) -> None:
    """With ``data.on_device``, keep the in-memory splits on the training device."""
    if config.data.on_device and device.type != "cpu" and config.data.streaming is None:
        bundle.train, bundle.val, bundle.test = (
            bundle.train.to(device),
            bundle.val.to(device),
            bundle.test.to(device),
        )


def train_batches(
    config: RunConfig, bundle: DataBundle, *, rank: int, world_size: int
) -> BatchLoader | MultiTaskMixer | PoissonBatches | StreamingBatches:
    """The training batch source. ``data.dataset``: shuffled batches of the training split
    (``BatchLoader``); ``data.datasets``: batches drawn by the configured sampler from each
    table's training rows (``MultiTaskMixer``); with ``train.privacy``, Poisson-sampled records
    of expected global size ``batch_size × world_size`` (``PoissonBatches``); with
    ``data.streaming``, batches read by worker processes. Under data parallelism, this
    process's share."""
    if isinstance(bundle.train, StreamedSplit):
        return streamed_batches(
            config, bundle.train, config.data.batch_size, shuffle=True, rank=rank,
            world_size=world_size,
        )  # fmt: skip
    if config.train.privacy is not None:
        return PoissonBatches(
            bundle.train,
            config.data.batch_size * world_size,
            seed=config.seed,
            rank=rank,
            world_size=world_size,
        )
    if config.data.datasets is None:
        return BatchLoader(
            bundle.train,
            config.data.batch_size,
            shuffle=True,
            seed=config.seed,
            rank=rank,
            world_size=world_size,
        )
    return mixer_from_bundle(
        bundle,
        config.data.batch_size,
        sampler=config.data.sampler.name,
        sampler_params=config.data.sampler.params,
        batch_mode=config.data.batch_mode,
        epoch=config.data.epoch,
        total_epochs=config.train.epochs,
        seed=config.seed,
        rank=rank,
        world_size=world_size,
    )


def eval_batches(
    config: RunConfig, bundle: DataBundle, split: str, *, rank: int = 0, world_size: int = 1
) -> BatchLoader | StreamingBatches:
    """Batches of one split in order; under data parallelism, this process's share."""
    dataset = getattr(bundle, split)
    if isinstance(dataset, StreamedSplit):
        return streamed_batches(
            config, dataset, config.data.eval_batch_size, shuffle=False, rank=rank,
            world_size=world_size,
        )  # fmt: skip
    return BatchLoader(dataset, config.data.eval_batch_size, rank=rank, world_size=world_size)
