"""What an epoch of training measures: per-task losses, absent steps and balancer weights, summed
on the device (no host sync per step, read once per epoch), and the time spent waiting for data.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor

from polytask.tasks import TaskSpec

__all__ = ["EpochMeter", "micro_batches"]

T = TypeVar("T")


def micro_batches(batches: Iterable[T], size: int) -> Iterator[tuple[list[T], float]]:
    """Groups of ``size`` consecutive batches (the last may be shorter), each with the seconds
    spent waiting for it."""
    iterator = iter(batches)
    while True:
        group: list[T] = []
        started = time.perf_counter()
        for batch in iterator:
            group.append(batch)
            if len(group) == size:
                break
        if not group:
            return
        yield group, time.perf_counter() - started


class EpochMeter:
    """Running sums of one epoch's steps, kept on ``device``."""

    def __init__(self, tasks: Sequence[TaskSpec], device: torch.device) -> None:
        k = len(tasks)
        self.tasks = list(tasks)
        self.loss_sum = torch.zeros(k, device=device)
        self.present_steps = torch.zeros(k, device=device)
        self.weight_sum = torch.zeros(k, device=device)
        self.steps = 0
        self.waited = 0.0
        self.started = time.perf_counter()

    def add(self, losses: Tensor, present: Tensor, weights: Tensor) -> None:
        """Count one optimizer step: its task losses, present mask and balancer weights."""
        self.loss_sum += torch.where(present, losses.detach(), torch.zeros_like(losses))
        self.present_steps += present
        self.weight_sum += weights
        self.steps += 1

    def running_means(self) -> list[float]:
        """Each task's mean loss so far (a host sync: throttle it)."""
        return (self.loss_sum / self.present_steps.clamp_min(1)).tolist()

    def summary(self, all_mean: Callable[[Tensor], Tensor]) -> dict[str, Any]:
        """The epoch's ``train``, ``weights``, ``data_wait_fraction`` and ``train_time_s``;
        ``all_mean`` averages the loss sums over processes (the surrogates average to the global
        losses)."""
        means = (all_mean(self.loss_sum) / self.present_steps.clamp_min(1)).tolist()
        present_counts = self.present_steps.tolist()
        weights_mean = (self.weight_sum / max(self.steps, 1)).tolist()
        elapsed = time.perf_counter() - self.started
        train = {
            t.name: {
                "loss": means[i] if present_counts[i] > 0 else math.nan,
                "absent_steps": self.steps - int(present_counts[i]),
            }
            for i, t in enumerate(self.tasks)
        }
        return {
            "train": train,
            "weights": {t.name: weights_mean[i] for i, t in enumerate(self.tasks)},
            "data_wait_fraction": round(self.waited / elapsed, 5) if elapsed > 0 else 0.0,
            "train_time_s": round(elapsed, 4),
        }
