"""The minimum-norm point of the convex hull of the task gradients: ``argmin_{w ∈ Δ} wᵀGw``
(MGDA, and the inner problem of CAGrad)."""

from __future__ import annotations

import numpy as np
from torch import Tensor

from polytask.balancing.solvers._gramian import check_gramian, normalize_numpy, to_numpy, to_torch
from polytask.balancing.solvers.nonnegative_qp import nonnegative_qp


def min_norm_simplex_numpy(g: np.ndarray) -> np.ndarray:
    k = g.shape[0]
    if k == 1:
        return np.ones(1)
    g = normalize_numpy(g)
    if not np.any(g):
        return np.full(k, 1.0 / k)
    if k == 2:
        # w1 = (G22 - G12) / (G11 + G22 - 2 G12), clipped to [0, 1]
        denom = g[0, 0] + g[1, 1] - 2.0 * g[0, 1]
        if denom <= 1e-15 * (g[0, 0] + g[1, 1]):
            return np.array([0.5, 0.5])
        w1 = float(np.clip((g[1, 1] - g[0, 1]) / denom, 0.0, 1.0))
        if w1 <= 0.5:
            return np.array([w1, 1.0 - w1])
        # w2 is the small one: from its own formula, not 1 - w1, which would lose all its
        # digits below eps (gradient norms 1e-4 and 1e4 give w2 ~ 1e-8)
        return np.array([w1, float(np.clip((g[0, 0] - g[0, 1]) / denom, 0.0, 1.0))])
    return _min_norm_nnqp(g)


def _min_norm_nnqp(g: np.ndarray, *, max_iter: int | None = None, tol: float = 1e-12) -> np.ndarray:
    """K > 2: min_{w in simplex} wᵀGw  ==  min_{u >= 0} uᵀGu + γ(1ᵀu - 1)², then w = u / 1ᵀu
    (for u = t·w the minimum over t is γq/(γ+q) with q = wᵀGw, increasing in q, for any γ > 0).
    γ = min_i G_ii >= q* keeps the small entries of G from being swamped by γ."""
    k = g.shape[0]
    diag = np.diag(g)
    zero = diag <= 0.0
    if zero.any():  # a zero gradient is the min-norm point
        return zero / zero.sum()
    gamma = float(diag.min())
    ones = np.ones(k)
    u = nonnegative_qp(g + gamma * np.outer(ones, ones), -gamma * ones, max_iter=max_iter, tol=tol)
    total = u.sum()
    if not total > 0.0 or not np.all(np.isfinite(u)):
        return np.full(k, 1.0 / k)
    return u / total


def min_norm_simplex(gramian: Tensor, *, max_iter: int | None = None, tol: float = 1e-12) -> Tensor:
    """The weights ``w`` on the probability simplex minimising ``wᵀ G w`` (so ``wᵀJ`` is the
    minimum-norm point of the convex hull of the rows of ``J``, as in MGDA).

    Exact: closed form for K = 2 (``w1 = clip((G22 - G12) / (G11 + G22 - 2 G12), 0, 1)``), and
    for K > 2 the equivalent non-negative least-squares problem
    ``min_{u >= 0} uᵀGu + γ(1ᵀu - 1)²`` (``γ = min_i G_ii``), ``w = u / 1ᵀu``, solved by
    ``nonnegative_qp``. ``G`` is first divided by its mean diagonal (the weights are
    scale-free); the KKT conditions ``(Gw)_i >= wᵀGw - tol'`` for all i, with equality where
    ``w_i > 0``, hold with ``tol'`` of order ``1e-12 · min_i G_ii`` (float64 round-off permitting).
    Singular ``G`` (duplicate rows) is handled; zero rows share the weight (the update is 0);
    an all-zero ``G`` gives uniform weights. ``max_iter`` and ``tol`` are passed to
    ``nonnegative_qp``. Runs on the CPU in float64 (moves the K×K Gramian to the host).

    Example:
        >>> import torch
        >>> min_norm_simplex(torch.tensor([[1.0, -1.0], [-1.0, 1.0]]))   # g and -g: 0 in hull
        tensor([0.5000, 0.5000])
    """
    check_gramian(gramian)
    k = gramian.shape[0]
    if k == 0:
        return gramian.new_zeros(0)
    g = to_numpy(gramian)
    if k > 2 and (max_iter is not None or tol != 1e-12):
        g = normalize_numpy(g)
        w = _min_norm_nnqp(g, max_iter=max_iter, tol=tol) if np.any(g) else np.full(k, 1.0 / k)
    else:
        w = min_norm_simplex_numpy(g)
    return to_torch(w, gramian)
