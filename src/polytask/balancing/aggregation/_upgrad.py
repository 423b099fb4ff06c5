"""UPGrad: average of the task gradients, each projected onto the dual cone of all of them."""

from __future__ import annotations

import torch
from torch import Tensor

from polytask.balancing.aggregation._dual_cone import DualConeProjection
from polytask.balancing.base import BALANCERS
from polytask.balancing.solvers.dual_cone import project_onto_dual_cone


@BALANCERS.register(
    "upgrad",
    "average of the gradients projected onto the dual cone, Jacobian descent (Quinton & Rey, 2024)",
)
class UPGrad(DualConeProjection):
    """UPGrad (Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", arXiv 2024;
    torchjd): every task gradient is projected onto the dual cone of all of them,
    ``C = {x : <x, g_j> >= 0 for every j}``, and the projections are averaged (weighted by the
    preference ``p``, uniform by default):

        ``d = Σ_i p_i π_C(g_i)``,  in weights ``w = Σ_i v_i`` with
        ``v_i = argmin_{v >= p_i e_i} vᵀ G v``.

    The update conflicts with no task (``<d, g_j> >= 0``), equals the mean when the tasks agree,
    is permutation-invariant and linear under scaling of J. As in torchjd, ``G`` is first
    normalised by its trace (a Jacobian with ``||J||_F² < norm_eps`` is treated as zero, and
    then the update is ``pᵀJ``); ``reg_eps · I`` is added only if asked (torchjd's default
    1e-4 allows conflicts of order ``reg_eps · v_j · tr(G)``). The K
    quadratic programs are solved exactly by ``project_onto_dual_cone`` on the CPU in float64
    (moves the K×K Gramian to the host).

    Numerical guarantee (default ``reg_eps=0``): ``<d, g_j> >= 0`` for every task, to
    ``20·K·eps·||g_j||·Σ|w_k| ||g_k||``, on gradient norms from 1e-4 to 1e4 in one matrix, zero,
    duplicated and near-opposite gradients, K from 2 to 10, P up to 1000, float32 and float64
    (``tests/balancing/aggregation/test_numerical_guarantees.py``); the K small QPs are solved
    exactly by an active-set method (singular ``G`` — duplicated or zero gradients — through its
    minimum-norm steps). It cannot hold when ``||J||_F² < norm_eps`` (then ``d = pᵀJ``) or with
    ``reg_eps > 0``: the old default ``reg_eps=1e-4`` left conflicts down to cosine −0.55 on
    badly scaled rows.

    Args:
        pref_vector: one non-negative weight per task (``None``: ``1/K`` over present tasks).
        norm_eps: below this squared Frobenius norm, J counts as zero.
        reg_eps: a ridge added to the normalised Gramian (default 0: exact; torchjd's 1e-4
            gives a unique, stable solution for singular ``G`` but allows conflicts).

    Example:
        >>> J = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])   # <g1, g2> = -1: they conflict
        >>> update, weights = UPGrad(["a", "b"], reg_eps=0.0).aggregate(J, torch.ones(2))
        >>> update   # (π(g1) + π(g2)) / 2 = ((0.5, 0.5) + (0, 1)) / 2
        tensor([0.2500, 0.7500])
        >>> weights
        tensor([1.0000, 0.7500])
    """

    def weights_from_gramian(
        self, gramian: Tensor, losses: Tensor, rows: Tensor | None = None
    ) -> Tensor:
        g, pref = self.cone_problem(gramian, rows)
        v = project_onto_dual_cone(g, torch.diag(pref))
        return v.sum(dim=0).to(device=gramian.device, dtype=gramian.dtype)


__all__ = ["UPGrad"]
