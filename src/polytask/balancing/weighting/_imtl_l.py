"""IMTL-L, the loss-balance part of Impartial Multi-Task Learning (Liu et al., ICLR 2021)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor, nn

from polytask.balancing.base import BALANCERS, LossWeighting
from polytask.balancing.weighting._masking import zero_absent
from polytask.tasks import TaskSpec


@BALANCERS.register(
    "imtl_l", "learned loss scales making every scaled loss equal (IMTL-L, Liu et al., ICLR 2021)"
)
class IMTLL(LossWeighting):
    """IMTL-L, the loss-balance part of Impartial Multi-Task Learning (Liu, Li, Kuang, Xue, Chen,
    Yang, Liao & Zhang, "Towards Impartial Multi-task Learning", ICLR 2021).

    Each task has a learnable log-scale ``s_k`` (initial value ``init_log_scale``); the combined
    loss is ``Σ_k e^{s_k} L_k - s_k`` over the present tasks and the weights are ``e^{s_k}``.
    For a fixed loss, ``∂/∂s_k = e^{s_k} L_k - 1`` vanishes at ``e^{s_k} L_k = 1``: the scales
    drive every scaled loss to 1. The log-scales are parameters: give ``balancer.parameters()`` to
    the optimizer. Losses should be positive.

    Example:
        >>> imtl = IMTLL(["a", "b"])
        >>> total, w = imtl.combine(torch.tensor([2.0, 0.5]), torch.tensor([True, True]))
        >>> float(total.detach()), w.tolist()   # e^0 * 2 - 0 + e^0 * 0.5 - 0
        (2.5, [1.0, 1.0])
    """

    requires_positive_losses: ClassVar[bool] = True
    captures_in_cuda_graph: ClassVar[bool] = True

    def __init__(self, tasks: Sequence[TaskSpec | str], *, init_log_scale: float = 0.0) -> None:
        super().__init__(tasks)
        self.log_scales = nn.Parameter(torch.full((self.num_tasks,), float(init_log_scale)))

    def combine(self, losses: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:
        log_scales = self.log_scales.to(losses.dtype)
        weights = zero_absent(torch.exp(log_scales), present)
        total = zero_absent(weights * losses - log_scales, present).sum()
        return total, weights
