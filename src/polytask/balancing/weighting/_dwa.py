"""Dynamic Weight Average (Liu, Johns & Davison, CVPR 2019)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor

from polytask.balancing.base import BALANCERS, LossWeighting
from polytask.balancing.weighting._masking import masked_softmax, tiny, zero_absent
from polytask.errors import ConfigError
from polytask.tasks import TaskSpec


@BALANCERS.register(
    "dwa",
    "dynamic weight average from the tasks' loss descent rates (Liu, Johns & Davison, CVPR 2019)",
)
class DynamicWeightAverage(LossWeighting):
    """Dynamic Weight Average (Liu, Johns & Davison, "End-to-End Multi-Task Learning with
    Attention", CVPR 2019, eq. 7).

    The paper weights epoch ``t`` with the ratio of the last two epoch-average losses:

        ``w_k(t) = K · exp(r_k(t-1) / T) / Σ_i exp(r_i(t-1) / T)``,
        ``r_k(t-1) = L_k(t-1) / L_k(t-2)``,

    and ``w_k = 1`` for the first two epochs. The balancer does not read the trainer's epoch: it
    averages the losses it receives over consecutive windows of ``window`` calls (a task's
    average is over the calls where it was present), so setting ``window`` to the number of
    steps per epoch reproduces the paper; a shorter window adapts faster. Weights are 1 during
    the first two windows. With absent tasks, the softmax runs over the present tasks and ``K``
    is the number of present tasks (every weight is 1 when the ratios agree, as in equal
    weighting). A task absent for a whole window keeps its previous average; a ratio whose
    denominator is not positive (the task was never seen) counts as 1. Losses should be
    positive.

    State (buffers, checkpointed): ``steps``, ``windows`` (completed windows), ``window_sum``
    and ``window_count`` (the current window) and ``averages`` (rows: window ``t-2``, ``t-1``).

    Args:
        tasks: the tasks, in the order of the losses.
        window: calls per averaging window (the paper's epoch).
        temperature: the softmax temperature ``T`` (larger: weights closer to 1).

    Example:
        >>> dwa = DynamicWeightAverage(["a", "b"], window=1)
        >>> present = torch.tensor([True, True])
        >>> for losses in ([1.0, 1.0], [1.0, 0.5]):  # two windows: weights stay 1
        ...     _ = dwa.combine(torch.tensor(losses), present)
        >>> total, w = dwa.combine(torch.tensor([1.0, 0.5]), present)
        >>> [round(v, 4) for v in w.tolist()]  # r = (1, 0.5): 2 * softmax(r / 2)
        [1.1244, 0.8756]
    """

    requires_positive_losses: ClassVar[bool] = True
    captures_in_cuda_graph: ClassVar[bool] = True
    steps: Tensor
    windows: Tensor
    window_sum: Tensor
    window_count: Tensor
    averages: Tensor

    def __init__(
        self, tasks: Sequence[TaskSpec | str], *, window: int = 100, temperature: float = 2.0
    ) -> None:
        super().__init__(tasks)
        if int(window) != window or window < 1:
            raise ConfigError(f"dwa: window must be an integer >= 1, found {window!r}")
        if not temperature > 0:
            raise ConfigError(f"dwa: temperature must be > 0, found {temperature!r}")
        self.window = int(window)
        self.temperature = float(temperature)
        k = self.num_tasks
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("windows", torch.zeros((), dtype=torch.long))
        self.register_buffer("window_sum", torch.zeros(k))
        self.register_buffer("window_count", torch.zeros(k))
        self.register_buffer("averages", torch.zeros(2, k))

    def ratios(self) -> Tensor:
        """``r_k = L_k(t-1) / L_k(t-2)`` from the last two window averages (1 where undefined)."""
        before, last = self.averages[0], self.averages[1]
        safe = before.clamp_min(tiny(before.dtype))
        return torch.where(before > 0, last / safe, torch.ones_like(last))

    def combine(self, losses: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:
        count = present.sum().to(losses.dtype)
        logits = self.ratios().to(losses.dtype) / self.temperature
        adaptive = count * masked_softmax(logits, present)
        ready = torch.ge(self.windows, 2)
        weights = torch.where(ready, adaptive, present.to(losses.dtype))
        self._accumulate(losses.detach(), present)
        return zero_absent(weights * losses, present).sum(), weights

    @torch.no_grad()
    def _accumulate(self, losses: Tensor, present: Tensor) -> None:
        self.window_sum += zero_absent(losses, present).to(self.window_sum.dtype)
        self.window_count += present.to(self.window_count.dtype)
        self.steps += 1
        closing = torch.eq(self.steps % self.window, 0)
        mean = torch.where(
            self.window_count > 0,
            self.window_sum / self.window_count.clamp_min(1),
            self.averages[1],
        )
        shifted = torch.stack([self.averages[1], mean])
        self.averages.copy_(torch.where(closing, shifted, self.averages))
        self.window_sum.masked_fill_(closing, 0.0)
        self.window_count.masked_fill_(closing, 0.0)
        self.windows += closing.long()
