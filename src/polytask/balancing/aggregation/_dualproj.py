"""DualProj: the mean gradient projected onto the dual cone of the task gradients."""

from __future__ import annotations

from torch import Tensor

from polytask.balancing.aggregation._dual_cone import DualConeProjection
from polytask.balancing.base import BALANCERS
from polytask.balancing.solvers.dual_cone import project_onto_dual_cone


@BALANCERS.register(
    "dualproj",
    "mean gradient projected onto the dual cone of the task gradients (Quinton & Rey, 2024)",
)
class DualProj(DualConeProjection):
    """DualProj (Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", arXiv
    2024; torchjd): the preference-weighted mean ``pᵀJ`` (uniform ``p`` by default) projected
    onto the dual cone ``C = {x : <x, g_j> >= 0 for every j}``:

        ``d = π_C(pᵀJ)``,  in weights ``w = argmin_{v >= p} vᵀ G v``.

    The update conflicts with no task and equals the mean when the tasks agree. The Gramian is
    normalised by its trace (and regularised by ``reg_eps · I`` if asked) as in ``UPGrad``
    (``||J||_F² < norm_eps`` counts as zero). The quadratic program is solved exactly by
    ``project_onto_dual_cone`` on the CPU in float64 (moves the K×K Gramian to the host).

    Numerical guarantee (default ``reg_eps=0``): ``<d, g_j> >= 0`` for every task and the
    weights are at least the preference, to ``20·K·eps·||g_j||·Σ|w_k| ||g_k||``, on gradient
    norms from 1e-4 to 1e4 in one matrix, zero, duplicated and near-opposite gradients, K from 2
    to 10, P up to 1000, float32 and float64
    (``tests/balancing/aggregation/test_numerical_guarantees.py``). It cannot hold when
    ``||J||_F² < norm_eps`` or with ``reg_eps > 0`` (the old default 1e-4 left conflicts on
    badly scaled rows).

    Args:
        pref_vector: one non-negative weight per task (``None``: ``1/K`` over present tasks).
        norm_eps: below this squared Frobenius norm, J counts as zero.
        reg_eps: a ridge added to the normalised Gramian (default 0: exact; torchjd's 1e-4
            gives a unique, stable solution for singular ``G`` but allows conflicts).

    Example:
        >>> import torch
        >>> J = torch.tensor([[1.0, 0.0], [-2.0, 1.0]])  # mean (-0.5, 0.5) conflicts with g1
        >>> update, weights = DualProj(["a", "b"], reg_eps=0.0).aggregate(J, torch.ones(2))
        >>> update   # projection onto {x1 >= 0, x2 >= 2 x1}: (0, 0.5)
        tensor([0.0000, 0.5000])
        >>> weights
        tensor([1.0000, 0.5000])
    """

    def weights_from_gramian(
        self, gramian: Tensor, losses: Tensor, rows: Tensor | None = None
    ) -> Tensor:
        g, pref = self.cone_problem(gramian, rows)
        weights = project_onto_dual_cone(g, pref)
        return weights.to(device=gramian.device, dtype=gramian.dtype)


__all__ = ["DualProj"]
