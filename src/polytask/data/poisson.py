"""Poisson sampling of records, the batches DP-SGD's privacy accountants assume.

Each step includes every record of the training split independently with probability
``q = expected_batch_size / N``, so batches vary in size (and may be empty). The privacy
analysis counts *records*: a record with several labels (or none) is sampled once.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from polytask.data.batches import Batch, MultiLabelDataset
from polytask.errors import DataError

__all__ = ["PoissonBatches"]


class PoissonBatches:
    """Batches of an in-memory dataset drawn by Poisson sampling (a ``BatchSource``).

    An epoch is ``round(1 / q)`` steps. Step ``s`` of epoch ``e`` draws its inclusion mask from a
    generator seeded by ``(seed, e)``, identical on every process; under data parallelism the
    selected records are dealt to the ``world_size`` processes in turn, so the union over the
    processes of a step's batches is the batch one process would draw, and the sampling rate
    of the global batch is ``q``.

    Args:
        dataset: the training split.
        expected_batch_size: the expected size of the global batch (``q · N``).
        seed: with the epoch, fixes every draw.
        rank, world_size: this process's share.

    Example:
        >>> data = MultiLabelDataset(torch.randn(100, 3), {"a": torch.randn(100)})
        >>> batches = PoissonBatches(data, 10)
        >>> len(batches), batches.sample_rate
        (10, 0.1)
    """

    def __init__(
        self,
        dataset: MultiLabelDataset,
        expected_batch_size: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        n = len(dataset)
        if n == 0:
            raise DataError("Poisson sampling needs a non-empty training split")
        if not 1 <= expected_batch_size <= n:
            raise DataError(
                f"batch_size (expected batch of Poisson sampling) must be in 1..{n} (the "
                f"training records), found {expected_batch_size}"
            )
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside 0..{world_size - 1}")
        self.dataset = dataset
        self.expected_batch_size = expected_batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch = 0

    @property
    def records(self) -> int:
        """N, the number of records sampled from."""
        return len(self.dataset)

    @property
    def sample_rate(self) -> float:
        """q, the probability that a step includes a given record."""
        return self.expected_batch_size / self.records

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return max(1, round(1 / self.sample_rate))

    def __iter__(self) -> Iterator[Batch]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        q = self.sample_rate
        for _ in range(len(self)):
            chosen = (torch.rand(self.records, generator=g) < q).nonzero().squeeze(1)
            share = chosen[self.rank :: self.world_size].to(self.dataset.device)
            yield self.dataset.take(share)
