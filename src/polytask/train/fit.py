"""What the Trainer draws from and what it returns: ``BatchSource``, ``EpochCallback`` and
``FitResult`` (re-exported by ``polytask.train.trainer``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from polytask.data.batches import Batch
from polytask.evaluate import TaskMetrics

__all__ = ["BatchSource", "EpochCallback", "FitResult"]


class BatchSource(Protocol):
    """What the Trainer draws training batches from (e.g. ``BatchLoader``)."""

    def set_epoch(self, epoch: int) -> None: ...
    def __len__(self) -> int: ...
    def __iter__(self) -> Iterator[Batch]: ...


@dataclass
class FitResult:
    """What ``Trainer.fit`` did."""

    epochs_run: int
    best_epoch: int
    best_value: float
    stopped_early: bool
    history: list[dict[str, Any]] = field(default_factory=list)
    val_metrics: TaskMetrics = field(default_factory=dict)


EpochCallback = Callable[[dict[str, Any]], None]
"""Called with each epoch's record after it is logged and checkpointed."""
