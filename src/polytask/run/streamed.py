"""``data.streaming``: the run's data read batch by batch through ``DataLoader`` workers.

``streamed_data`` checks that the rest of the configuration can run on streamed splits and
builds them (``polytask.data.streaming_sources.stream_bundle``); ``streamed_batches`` is the
training or evaluation ``BatchSource`` over one of them, with the order, resume and DDP shares
of ``BatchLoader`` (``polytask.data.streaming.StreamingBatches``).
"""

from __future__ import annotations

from polytask.config import RunConfig
from polytask.data.bundle import DataBundle
from polytask.data.streaming import StreamedSplit, StreamingBatches
from polytask.data.streaming_sources import StreamOptions, stream_bundle
from polytask.errors import ConfigError


def _unsupported(config: RunConfig) -> list[str]:
    """The settings that need the whole split in memory, each with the field that asks."""
    problems = []
    if config.data.datasets is not None:
        problems.append("data.datasets (a streamed run reads one dataset, data.dataset)")
    if config.train.privacy is not None:
        problems.append("train.privacy (Poisson sampling draws from the in-memory split)")
    if config.evaluate.group_by is not None:
        problems.append("evaluate.group_by (GAUC groups are read from the in-memory split)")
    return problems


def streamed_data(config: RunConfig) -> DataBundle:
    """The ``DataBundle`` of ``data.dataset`` with streamed splits (``data.streaming`` set);
    one ``ConfigError`` listing every setting that cannot run on streamed data."""
    streaming = config.data.streaming
    assert streaming is not None
    problems = _unsupported(config)
    if problems:
        raise ConfigError(
            "data.streaming: cannot be combined with " + "; ".join(problems)
            + "; set data.streaming: null to load the data in memory"
        )  # fmt: skip
    assert config.data.dataset is not None  # the schema requires `dataset` or `datasets`
    options = StreamOptions(
        seed=config.seed,
        val_fraction=config.data.val_fraction,
        test_fraction=config.data.test_fraction,
        standardize=config.data.standardize,
        workers=streaming.workers,
        cache_dir=streaming.cache_dir,
        chunk_rows=streaming.chunk_rows,
    )
    bundle = stream_bundle(
        config.data.dataset, config.data.params, options, tasks=config.data.tasks
    )
    for task in bundle.tasks:  # label maps are read with the images: nothing to count
        if task.name in config.data.class_balance and task.name not in bundle.train.targets:
            raise ConfigError(
                f"data.class_balance.{task.name}: applies to binary and multiclass tasks, not "
                f"{task.kind}"
            )
    return bundle


def streamed_batches(
    config: RunConfig,
    split: StreamedSplit,
    batch_size: int,
    *,
    shuffle: bool,
    rank: int,
    world_size: int,
) -> StreamingBatches:
    """Batches of a streamed split read by ``data.streaming.workers`` processes (training:
    ``shuffle`` with the run's seed; evaluation: in order); this process's DDP share."""
    streaming = config.data.streaming
    assert streaming is not None
    return StreamingBatches(
        split,
        batch_size,
        shuffle=shuffle,
        seed=config.seed,
        rank=rank,
        world_size=world_size,
        workers=streaming.workers,
        prefetch=streaming.prefetch,
        persistent=shuffle,  # the training source lives for the run; evaluation's for one pass
    )
