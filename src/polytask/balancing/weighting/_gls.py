"""Geometric Loss Strategy (Chennupati et al., MultiNet++, CVPR Workshops 2019)."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from polytask.balancing.base import BALANCERS, LossWeighting
from polytask.balancing.weighting._masking import EPS, zero_absent


@BALANCERS.register(
    "gls", "geometric mean of the task losses (Chennupati et al., MultiNet++, CVPRW 2019)"
)
class GeometricLossStrategy(LossWeighting):
    """Geometric Loss Strategy (Chennupati, Sistu, Yogamani & Rawashdeh, "MultiNet++:
    Multi-Stream Feature Aggregation and Geometric Loss Strategy for Multi-Task Learning",
    CVPR Workshops 2019).

    The combined loss is the geometric mean of the present tasks' losses,

        ``L = (Π_k L_k)^(1/n) = exp(mean_k log L_k)``   (``n`` = number of present tasks),

    computed in log space; absent tasks are left out of the product. Its gradient is
    ``Σ_k w_k ∇L_k`` with the reported effective weights ``w_k = ∂L/∂L_k = L / (n · L_k)``: every
    task gets the same relative step ``w_k L_k = L / n``, whatever the scale of its loss. Losses
    below ``1e-8`` are clamped there (such a task gets weight 0): losses should be non-negative.

    Example:
        >>> gls = GeometricLossStrategy(["a", "b"])
        >>> total, w = gls.combine(torch.tensor([1.0, 4.0]), torch.tensor([True, True]))
        >>> float(total), w.tolist()   # sqrt(1 * 4) = 2; 2 / (2 * 1), 2 / (2 * 4)
        (2.0, [1.0, 0.25])
    """

    requires_positive_losses: ClassVar[bool] = True
    captures_in_cuda_graph: ClassVar[bool] = True

    def combine(self, losses: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:
        count = present.sum()
        clamped = losses.clamp_min(EPS)
        safe = torch.where(present, clamped, torch.ones_like(losses))
        mean_log = torch.log(safe).sum() / count.clamp_min(1).to(losses.dtype)
        total = torch.where(count > 0, torch.exp(mean_log), torch.zeros_like(mean_log))
        weights = total.detach() / (count.to(losses.dtype).clamp_min(1) * safe.detach())
        weights = zero_absent(weights, present & (losses >= EPS))
        return total, weights
