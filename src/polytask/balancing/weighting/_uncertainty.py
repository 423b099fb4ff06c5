"""Homoscedastic uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor, nn

from polytask.balancing.base import BALANCERS, LossWeighting
from polytask.tasks import TaskSpec


@BALANCERS.register(
    "uncertainty", "learned homoscedastic-uncertainty weights (Kendall, Gal & Cipolla, CVPR 2018)"
)
class UncertaintyWeighting(LossWeighting):
    """Homoscedastic uncertainty weighting (Kendall, Gal & Cipolla, "Multi-Task Learning Using
    Uncertainty to Weigh Losses for Scene Geometry and Semantics", CVPR 2018).

    Each task has a learnable ``s_k = log σ_k²`` (initial value ``init_log_var``). The combined
    loss is, following eq. (7)-(10) of the paper,

        ``sum_k c_k · exp(-s_k) · L_k + s_k / 2``

    with ``c_k = 1/2`` for regression (Gaussian likelihood) and ``c_k = 1`` for classification
    (scaled softmax likelihood). Tasks given as plain names use ``c_k = 1/2``. Tasks absent from
    a batch contribute nothing (neither loss nor regulariser). The reported weights are
    ``c_k · exp(-s_k)``. The log-variances are parameters: give ``balancer.parameters()`` to the
    optimizer; they are saved in the balancer's ``state_dict``.

    Example:
        >>> u = UncertaintyWeighting([TaskSpec("r", "regression"), TaskSpec("c", "binary")])
        >>> total, w = u.combine(torch.tensor([2.0, 1.0]), torch.tensor([True, True]))
        >>> float(total.detach()), w.tolist()   # 0.5*1*2 + 0 + 1*1*1 + 0 at s = 0
        (2.0, [0.5, 1.0])
    """

    requires_positive_losses: ClassVar[bool] = True
    captures_in_cuda_graph: ClassVar[bool] = True
    factors: Tensor

    def __init__(self, tasks: Sequence[TaskSpec | str], *, init_log_var: float = 0.0) -> None:
        super().__init__(tasks)
        self.log_vars = nn.Parameter(torch.full((self.num_tasks,), float(init_log_var)))
        factors = [
            1.0 if isinstance(t, TaskSpec) and t.kind != "regression" else 0.5 for t in self.tasks
        ]
        self.register_buffer("factors", torch.tensor(factors))

    def combine(self, losses: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:
        log_vars = self.log_vars.to(losses.dtype)
        weights = self.factors.to(losses.dtype) * torch.exp(-log_vars)
        terms = weights * losses + 0.5 * log_vars
        total = torch.where(present, terms, torch.zeros_like(terms)).sum()
        return total, torch.where(present, weights, torch.zeros_like(weights))
