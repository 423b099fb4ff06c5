"""Early stopping: the best value of the monitored quantity, and the epochs since it improved.

Example:
    >>> stop = EarlyStopping(patience=2)
    >>> [stop.update(v, epoch) for epoch, v in enumerate([1.0, 0.5, 0.7, 0.6], start=1)]
    [True, True, False, False]
    >>> stop.best, stop.best_epoch, stop.should_stop
    (0.5, 2, True)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from polytask.evaluate import TaskMetrics, monitor_higher_is_better, monitor_value
from polytask.tasks import TaskSpec

__all__ = ["EarlyStopping", "early_stopping_for"]


@dataclass
class EarlyStopping:
    """Tracks the best value of the monitored quantity and the epochs since it improved."""

    metric: str = "loss"
    higher_is_better: bool = False
    patience: int | None = None
    min_delta: float = 0.0
    best: float = math.nan
    best_epoch: int = 0
    bad_epochs: int = 0

    def update(self, value: float, epoch: int) -> bool:
        """Record ``value`` at ``epoch``; True when it is the best so far. A value that is not
        finite (NaN: a diverged model, or no labelled validation sample) is never the best."""
        if not math.isfinite(value):
            improved = False
        elif math.isnan(self.best):
            improved = True
        elif self.higher_is_better:
            improved = value > self.best + self.min_delta
        else:
            improved = value < self.best - self.min_delta
        if improved:
            self.best, self.best_epoch, self.bad_epochs = value, epoch, 0
        else:
            self.bad_epochs += 1
        return improved

    def update_from(self, val_metrics: TaskMetrics, tasks: Sequence[TaskSpec], epoch: int) -> bool:
        """Record the monitored metric of an epoch's validation; True when it is the best so far.
        Without validation metrics the latest epoch is the best."""
        if not val_metrics:
            return self.update(-float(epoch), epoch)
        return self.update(monitor_value(val_metrics, tasks, self.metric), epoch)

    def monitor(self) -> dict[str, Any]:
        """What an epoch's record says about the monitored quantity."""
        return {"metric": self.metric, "best": self.best, "best_epoch": self.best_epoch}

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.bad_epochs >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.best = float(state["best"])
        self.best_epoch = int(state["best_epoch"])
        self.bad_epochs = int(state["bad_epochs"])


def early_stopping_for(
    tasks: Sequence[TaskSpec], metric: str, *, patience: int | None, min_delta: float = 0.0
) -> EarlyStopping:
    """An ``EarlyStopping`` whose direction follows the monitored metric."""
    return EarlyStopping(
        metric=metric,
        higher_is_better=monitor_higher_is_better(tasks, metric),
        patience=patience,
        min_delta=min_delta,
    )
