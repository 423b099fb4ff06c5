"""Tensors in memory and the batches drawn from them.

``MultiLabelDataset`` holds a split's inputs (a tensor, or a dict of named tensors) and one label
tensor per task; ``BatchLoader`` draws batches from it by slicing tensors (no per-sample Python
work), reproducibly per (seed, epoch). A ``Batch`` is ``(inputs, {task: labels})``: what every
batch source yields and what the Trainer, ``evaluate`` and the inference iterator read.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from polytask.data.preprocess import Inputs, inputs_to, num_rows, take_inputs
from polytask.errors import DataError
from polytask.tasks import TaskSpec

#: one batch: the inputs and a label tensor per task
Batch = tuple[Inputs, dict[str, Tensor]]


def target_tensor(task: TaskSpec, values: np.ndarray) -> Tensor:
    """Labels as the tensor type the task's loss expects (int64 classes, float32 otherwise)."""
    if task.kind in ("multiclass", "segmentation"):
        return torch.as_tensor(np.asarray(values), dtype=torch.int64)
    y = torch.as_tensor(np.asarray(values, dtype=np.float32))
    if task.kind in ("binary", "multilabel"):
        y = torch.where(y < 0, torch.full_like(y, float("nan")), y)
    return y


class MultiLabelDataset(Dataset[Batch]):
    """In-memory tensors: ``inputs`` ``[N, ...]`` (or a dict of them) and one label tensor per
    task."""

    def __init__(self, inputs: Inputs, targets: dict[str, Tensor]) -> None:
        self.inputs = inputs
        self.targets = targets

    def __len__(self) -> int:
        return num_rows(self.inputs)

    def __getitem__(self, index: int) -> Batch:
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


def missing_labels(task: TaskSpec, template: Tensor | None, n: int) -> Tensor:
    """``n`` missing labels of ``task`` (an expanded view: no memory per sample)."""
    if template is not None:
        shape, dtype = tuple(template.shape[1:]), template.dtype
    else:
        wide = task.kind == "multilabel" or (task.kind == "regression" and task.num_classes > 1)
        shape = (task.num_classes,) if wide else ()
        dtype = torch.int64 if task.kind in ("multiclass", "segmentation") else torch.float32
    fill = -1 if task.kind in ("multiclass", "segmentation") else float("nan")
    return torch.full((1, *shape), fill, dtype=dtype).expand(n, *shape)


def epoch_order(n: int, *, shuffle: bool, seed: int, epoch: int) -> Tensor:
    """The sample order of epoch ``epoch``: a permutation of ``range(n)`` that depends only on
    ``(seed, epoch)`` when shuffling, else ``0..n-1`` (shared by every batch source, so in-memory
    and streamed data draw the same samples)."""
    if not shuffle:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def rank_share(batch: Tensor, rank: int, world_size: int) -> Tensor:
    """Process ``rank``'s contiguous share of a global batch (the shares are disjoint and
    together the whole batch; the last processes' shares may be shorter or empty)."""
    share = -(-len(batch) // world_size)
    return batch[rank * share : (rank + 1) * share]


def check_batching(batch_size: int, rank: int, world_size: int) -> None:
    """``DataError`` unless ``batch_size >= 1`` and ``0 <= rank < world_size``."""
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, found {batch_size}")
    if not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is outside 0..{world_size - 1}")


def batches_per_epoch(n: int, batch_size: int, world_size: int, drop_last: bool) -> int:
    """Global batches of ``world_size · batch_size`` samples in an epoch of ``n`` samples."""
    size = batch_size * world_size
    return n // size if drop_last else -(-n // size)


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
        check_batching(batch_size, rank, world_size)
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
        return batches_per_epoch(n, self.batch_size, self.world_size, self.drop_last)

    def __iter__(self) -> Iterator[Batch]:
        n, seed, epoch = len(self.dataset), self.seed, self.epoch
        order = epoch_order(n, shuffle=self.shuffle, seed=seed, epoch=epoch)
        order = order.to(self.dataset.device)  # one copy per epoch, not one per batch
        size = self.batch_size * self.world_size
        for i in range(len(self)):
            batch = order[i * size : (i + 1) * size]
            yield self.dataset.take(rank_share(batch, self.rank, self.world_size))
