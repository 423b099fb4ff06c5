"""IMTL-G: the update with equal projections onto every task's unit gradient."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from polytask.balancing.base import BALANCERS
from polytask.balancing.engine import GramianWeightingAggregator, Level
from polytask.tasks import TaskSpec


def imtl_g_weights(gramian: Tensor, *, zero_tol: float = 1e-10) -> Tensor:
    """The IMTL-G weights ``α`` (summing to 1) from the Gramian.

    With ``n_i = ||g_i||``, the conditions ``<d, u_i> = μ`` for all i and ``Σ α_i = 1`` read
    ``G α = μ n``, ``1ᵀα = 1``. Writing ``β_i = n_i α_i`` and ``C = D⁻¹ G D⁻¹`` (the cosine
    matrix, ``D = diag(n)``) gives the well-scaled symmetric system
    ``[C, -1; (1/n)ᵀ, 0] [β; μ] = [0; 1]``, solved by least squares (minimum-norm solution,
    so singular cases — duplicate or opposed gradients — are handled symmetrically). Tasks
    whose gradient norm is ``<= zero_tol · max_i n_i`` have no direction to be impartial to:
    they are left out of the conditions and weighted 0. An all-zero Gramian gives ``1/K``.

    Example:
        >>> imtl_g_weights(torch.tensor([[1.0, 0.0], [0.0, 4.0]]))   # norms 1 and 2
        tensor([0.6667, 0.3333])
    """
    k = gramian.shape[0]
    g = gramian.detach().to("cpu", torch.float64)
    norms = g.diagonal().clamp_min(0).sqrt()
    top = norms.max() if k else norms.new_zeros(())
    active = norms > zero_tol * top
    if k == 0:
        return gramian.new_zeros(0)
    idx = active.nonzero().squeeze(1)
    m = idx.numel()
    if m == 0:
        return torch.full((k,), 1.0 / k, dtype=gramian.dtype, device=gramian.device)
    n = norms[idx]
    cos = g[idx][:, idx] / (n[:, None] * n[None, :])
    inv = 1.0 / n
    inv_scale = inv.max()
    system = g.new_zeros(m + 1, m + 1)
    system[:m, :m] = cos
    system[:m, m] = -1.0
    system[m, :m] = inv / inv_scale
    rhs = g.new_zeros(m + 1)
    rhs[m] = 1.0 / inv_scale
    # lstsq via the pseudo-inverse (rcond relative to the largest singular value)
    solution = torch.linalg.pinv(system, rtol=1e-12, hermitian=False) @ rhs
    alpha = solution[:m] * inv
    total = alpha.sum()
    good = torch.isfinite(alpha).all() & (total.abs() > 1e-12)
    alpha = torch.where(good, alpha / torch.where(good, total, 1.0), torch.full_like(alpha, 1 / m))
    weights = g.new_zeros(k)
    weights[idx] = alpha
    return weights.to(device=gramian.device, dtype=gramian.dtype)


@BALANCERS.register(
    "imtl_g",
    "gradient with equal projections onto every unit task gradient, IMTL-G (Liu et al., ICLR 2021)",
)
class IMTLG(GramianWeightingAggregator):
    """IMTL-G (Liu, Li, Kuang, Xue, Chen, Yang, Liao & Zhang, "Towards Impartial Multi-task
    Learning", ICLR 2021): the update ``d = Σ α_i g_i`` with ``Σ α_i = 1`` whose projections
    onto every task's unit gradient ``u_i = g_i / ||g_i||`` are equal,

        ``<d, u_1 - u_i> = 0`` for all i, so that
        ``α_{2..K} = g_1 Uᵀ (D Uᵀ)⁻¹``, ``α_1 = 1 - Σ_{i>1} α_i``

    with ``D = [g_1 - g_2; …; g_1 - g_K]`` and ``U = [u_1 - u_2; …; u_1 - u_K]`` (paper eq. 9).
    It is computed from the Gramian alone, through the equivalent symmetric system
    ``G α = μ ||g||``, ``1ᵀα = 1`` (``imtl_g_weights``), with a pseudo-inverse for singular
    cases (the paper inverts ``D Uᵀ``); zero gradients get weight 0. The K×K system is solved
    in float64 on the CPU (moves the Gramian to the host).

    Numerical guarantee: ``Σ α = 1`` and the projections ``<d, g_i / ||g_i||>`` are equal for
    every non-zero gradient, to ``100·K·eps·Σ|α_k| ||g_k||``, on gradient norms from 1e-4 to 1e4
    in one matrix, zero, duplicated and near-opposite gradients, K from 2 to 10, P up to 1000,
    float32 and float64 (``tests/balancing/aggregation/test_numerical_guarantees.py``). A zero
    gradient has no direction: weight 0, outside the condition.

    Example:
        >>> J = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
        >>> update, weights = IMTLG(["a", "b"]).aggregate(J, torch.ones(2))
        >>> update   # α = (2/3, 1/3): d = (2/3, 2/3), <d, u_1> = <d, u_2> = 2/3
        tensor([0.6667, 0.6667])
    """

    def __init__(
        self,
        tasks: Sequence[TaskSpec | str],
        *,
        level: Level = "parameters",
        update_every: int = 1,
    ) -> None:
        super().__init__(tasks, level=level, update_every=update_every)

    def weights_from_gramian(
        self, gramian: Tensor, losses: Tensor, rows: Tensor | None = None
    ) -> Tensor:
        return imtl_g_weights(gramian)


__all__ = ["IMTLG", "imtl_g_weights"]
