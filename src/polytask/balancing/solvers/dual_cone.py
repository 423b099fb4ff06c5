"""The projection onto the dual cone of the task gradients, in weights: ``argmin_{v >= u} vᵀGv``
(UPGrad, DualProj)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from polytask.balancing.solvers._gramian import check_gramian, normalize_numpy, to_numpy, to_torch
from polytask.balancing.solvers.nonnegative_qp import nonnegative_qp


def _dual_cone_np(g: np.ndarray, u: np.ndarray) -> np.ndarray:
    # v = u + z, z >= 0:  vᵀGv = zᵀGz + 2 (Gu)ᵀz + const  ->  NNQP(Q = G, c = Gu)
    out = np.empty_like(u)
    for row in range(u.shape[0]):
        z = nonnegative_qp(g, g @ u[row])
        out[row] = u[row] + z
    return out


def project_onto_dual_cone(gramian: Tensor, u: Tensor) -> Tensor:
    """``argmin_{v >= u} vᵀ G v``: the weights of the projection of ``uᵀJ`` onto the dual cone
    ``{x : <x, g_j> >= 0 for every row g_j of J}`` (Quinton & Rey, "Jacobian Descent for
    Multi-Objective Optimization", 2024, Proposition/Lemma on the projection's dual).

    With ``v`` optimal, ``vᵀJ`` is that projection: the KKT conditions give ``G v >= 0`` (the
    projection conflicts with no row), ``v >= u``, and ``(Gv)_i = 0`` where ``v_i > u_i``.
    ``u`` is ``[K]`` or a batch ``[M, K]`` (one problem per row); the result has its shape.
    Solved exactly by ``nonnegative_qp`` on ``G`` divided by its mean diagonal (the weights are
    scale-free). Regularise ``G`` (``G + εI``) before calling if you want a unique ``v`` with
    singular ``G``; without it ``v`` is the minimiser closest to ``u`` along the active-set path.
    Runs on the CPU in float64 (moves the K×K Gramian to the host).

    Example:
        >>> G = torch.tensor([[1.0, -1.0], [-1.0, 1.0]])    # g and -g: the cone is g's normal
        >>> project_onto_dual_cone(G, torch.tensor([1.0, 0.0]))   # projection of g is 0
        tensor([1., 1.])
    """
    check_gramian(gramian)
    k = gramian.shape[0]
    if u.shape[-1] != k or u.ndim not in (1, 2):
        raise ValueError(
            f"`u` should have shape ({k},) or (M, {k}) for a {k}×{k} Gramian, found "
            f"{tuple(u.shape)}"
        )
    g = normalize_numpy(to_numpy(gramian))
    u_np = u.detach().to("cpu", torch.float64).numpy().reshape(-1, k)
    v = _dual_cone_np(g, u_np) if k else u_np
    return to_torch(v.reshape(tuple(u.shape)), gramian)
