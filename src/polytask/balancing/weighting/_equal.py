"""Equal weighting: the sum of the task losses."""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from polytask.balancing.base import BALANCERS, LossWeighting


@BALANCERS.register("equal", "sum of the task losses, every task weighted 1")
class EqualWeighting(LossWeighting):
    """Equal weighting: the update is the gradient of ``sum_k L_k``.

    Example:
        >>> import torch
        >>> w = EqualWeighting(["a", "b"])
        >>> total, weights = w.combine(torch.tensor([1.0, 3.0]), torch.tensor([True, True]))
        >>> float(total), weights.tolist()
        (4.0, [1.0, 1.0])
    """

    captures_in_cuda_graph: ClassVar[bool] = True

    def combine(self, losses: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:
        weights = present.to(losses.dtype)
        return (weights * losses).sum(), weights
