"""PCGrad: project each task gradient off the gradients it conflicts with."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from polytask.balancing.base import BALANCERS
from polytask.balancing.engine import GradientAggregator, Level
from polytask.balancing.jacobian import gramian
from polytask.errors import ConfigError
from polytask.tasks import TaskSpec

REDUCTIONS = ("sum", "mean")


def pcgrad_coefficients(gram: Tensor, orders: Tensor, *, eps: float = 1e-30) -> Tensor:
    """The K×K matrix ``C`` with ``C @ J`` the projected gradients ``g_i^PC`` (row i).

    Row i starts as ``e_i``; for each ``j`` in ``orders[i]`` (the other tasks, in order), if
    ``<g_i', g_j> < 0`` then ``g_i' ← g_i' - <g_i', g_j> / ||g_j||² · g_j``, that is
    ``C[i, j] -= (C[i] @ G[:, j]) / G[j, j]``. Computed from the Gramian only, vectorised over
    i (one step per position in the orders), without host synchronisation. ``orders`` is
    ``[K, K-1]`` (long); zero gradients (``G[j, j] = 0``) are never projected against.

    Example:
        >>> G = torch.tensor([[1.0, -1.0], [-1.0, 4.0]])   # g1 = (1, 0), g2 = (-1, sqrt(3))
        >>> pcgrad_coefficients(G, torch.tensor([[1], [0]]))
        tensor([[1.0000, 0.2500],
                [1.0000, 1.0000]])
    """
    k = gram.shape[0]
    coef = torch.eye(k, dtype=gram.dtype, device=gram.device)
    rows = torch.arange(k, device=gram.device)
    diag = gram.diagonal()
    for position in range(orders.shape[1] if orders.ndim == 2 else 0):
        j = orders[:, position]
        inner = (coef * gram[:, j].T).sum(dim=1)  # <g_i', g_j> = C[i] @ G[:, j]
        norm2 = diag[j]
        conflict = (inner < 0) & (norm2 > eps)
        step = torch.where(conflict, inner / torch.where(conflict, norm2, 1.0), 0.0)
        coef[rows, j] = coef[rows, j] - step
    return coef


@BALANCERS.register(
    "pcgrad", "project conflicting gradients, gradient surgery (Yu et al., NeurIPS 2020)"
)
class PCGrad(GradientAggregator):
    """PCGrad (Yu, Kumar, Gupta, Levine, Hausman & Finn, "Gradient Surgery for Multi-Task
    Learning", NeurIPS 2020), Algorithm 1.

    For each task i, ``g_i' = g_i``; then for every other task j in a random order (drawn
    afresh for each i and each step), if ``<g_i', g_j> < 0`` the conflicting component is
    removed: ``g_i' ← g_i' - <g_i', g_j> / ||g_j||² · g_j``. The update is ``Σ_i g_i'``
    (``reduction="sum"``, the paper's) or its mean (``reduction="mean"``).

    Every ``g_i'`` is a linear combination of the rows of J, so the coefficients are tracked
    from the Gramian (``pcgrad_coefficients``) and the reported weights satisfy
    ``weights @ J == update`` exactly. The method is not a fixed weighting of the gradients
    (the order is random and the projections depend on J), so ``update_every`` must be 1.

    Being a weighting of the Gramian, it takes the layer-wise Gramian where the model allows it
    (``layerwise.py``): same weights and update as on the Jacobian path, without forming J.

    The orders come from a CPU ``torch.Generator`` seeded by ``seed``; its state is kept in the
    buffer ``rng_state``, so ``state_dict()`` round-trips the random stream exactly (no device
    synchronisation: the generator never leaves the CPU).

    Numerical guarantee: the update equals Algorithm 1 run in float64 on the rows with the same
    orders, to ``50·K²·eps·Σ_i ||g_i||``, and with K = 2 no task conflicts with it (``<g_i, d>
    >= −tol·||g_i||``; for K > 2 a later projection may reintroduce a conflict with an earlier
    task, as in the paper), on gradient norms from 1e-4 to 1e4 in one matrix, zero, duplicated
    and near-opposite gradients, K from 2 to 10, P up to 1000, float32 and float64
    (``tests/balancing/aggregation/test_numerical_guarantees.py``).

    Example:
        >>> J = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])   # <g1, g2> = -1: they conflict
        >>> update, weights = PCGrad(["a", "b"]).aggregate(J, torch.ones(2))
        >>> update   # g1' = g1 + g2/2 = (0.5, 0.5); g2' = g2 + g1 = (0, 1)
        tensor([0.5000, 1.5000])
        >>> weights  # update = 2 g1 + 1.5 g2
        tensor([2.0000, 1.5000])
    """

    rng_state: Tensor

    def __init__(
        self,
        tasks: Sequence[TaskSpec | str],
        *,
        reduction: str = "sum",
        seed: int = 0,
        level: Level = "parameters",
        update_every: int = 1,
    ) -> None:
        super().__init__(tasks, level=level, update_every=update_every)
        if reduction not in REDUCTIONS:
            raise ConfigError(f"reduction must be one of {REDUCTIONS}, found {reduction!r}")
        self.reduction = reduction
        self.seed = int(seed)
        self._generator = torch.Generator(device="cpu")
        self._generator.manual_seed(self.seed)
        self.register_buffer("rng_state", self._generator.get_state())
        self.register_load_state_dict_post_hook(_restore_generator)

    def draw_orders(self, k: int) -> Tensor:
        """``[k, k-1]``: for each task i a random order of the other tasks (advances the
        generator and saves its state in ``rng_state``)."""
        keys = torch.rand(k, k, generator=self._generator)
        keys.fill_diagonal_(2.0)  # self sorts last and is dropped
        orders = keys.argsort(dim=1)[:, : k - 1]
        self.rng_state.copy_(self._generator.get_state())
        return orders

    def weights_from_gramian(
        self, gramian: Tensor, losses: Tensor, rows: Tensor | None = None
    ) -> Tensor:
        """The weights ``1ᵀC`` (divided by K for ``reduction="mean"``) from the Gramian of the
        present tasks (float64 but on MPS); draws this step's random orders."""
        k = gramian.shape[0]
        wide = torch.float32 if gramian.device.type == "mps" else torch.float64
        gram = gramian.to(wide)
        orders = self.draw_orders(k).to(gram.device)
        weights = pcgrad_coefficients(gram, orders).sum(dim=0)
        return weights / k if self.reduction == "mean" else weights

    def aggregate(
        self, jacobian: Tensor, losses: Tensor, rows: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        weights = self.weights_from_gramian(gramian(jacobian), losses, rows).to(jacobian.dtype)
        return weights @ jacobian, weights

    def _is_gramian_weighting(self) -> bool:
        # a weighting of the Gramian (drawn afresh each step): takes the layer-wise path
        return True

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}, seed={self.seed}, level={self.level!r}"


def _restore_generator(module: torch.nn.Module, incompatible: Any) -> None:
    """After ``load_state_dict``: continue the random stream from the loaded ``rng_state``."""
    if isinstance(module, PCGrad):
        module._generator.set_state(module.rng_state.detach().to("cpu", torch.uint8))


__all__ = ["REDUCTIONS", "PCGrad", "pcgrad_coefficients"]
