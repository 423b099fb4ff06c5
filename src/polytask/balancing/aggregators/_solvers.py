"""Small exact solvers shared by the gradient aggregators (no method is registered here).

Every solver works on the K×K Gramian ``G = J Jᵀ`` of the task gradients (K is small, at most a
few tens), in float64 numpy on the CPU: calling one moves the Gramian to the host (a device sync,
inherent to solving a small problem exactly). The torch-facing functions take and return torch
tensors (on the Gramian's device, in its floating dtype).

Public API (stable; other aggregators import it):

* ``nonnegative_qp(Q, c)``: ``min ½ xᵀQx + cᵀx`` over ``x >= 0`` (numpy, the building block);
* ``min_norm_simplex(G)``: the weights ``w`` on the simplex minimising ``wᵀGw`` (MGDA);
* ``project_onto_dual_cone(G, u)``: ``argmin_{v >= u} vᵀGv`` (UPGrad, DualProj);
* ``conflict_averse_simplex(G, center=β, radius=s)``: ``argmin_{w ∈ Δ} wᵀGβ + s·√(wᵀGw)``
  (CAGrad);
* ``normalize_gramian(G)``: ``G`` divided by its mean diagonal (scale-free solves).

Example:
    >>> G = torch.tensor([[1.0, 0.0], [0.0, 4.0]])   # two orthogonal gradients, norms 1 and 2
    >>> min_norm_simplex(G)                           # w1 = 4 / (1 + 4)
    tensor([0.8000, 0.2000])
    >>> project_onto_dual_cone(torch.tensor([[1.0, -1.0], [-1.0, 4.0]]), torch.tensor([1.0, 0.0]))
    tensor([1.0000, 0.2500])
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "conflict_averse_simplex",
    "min_norm_simplex",
    "nonnegative_qp",
    "normalize_gramian",
    "project_onto_dual_cone",
]

_TINY = 1e-300


def _check_gramian(gramian: Tensor, name: str = "gramian") -> None:
    if gramian.ndim != 2 or gramian.shape[0] != gramian.shape[1]:
        raise ValueError(f"`{name}` should be a square matrix, found shape {tuple(gramian.shape)}")


def _to_numpy(gramian: Tensor) -> np.ndarray:
    """The Gramian as a symmetric float64 numpy array, non-finite entries replaced by 0."""
    g = gramian.detach().to("cpu", torch.float64).numpy()
    g = np.nan_to_num(0.5 * (g + g.T), nan=0.0, posinf=0.0, neginf=0.0)
    return g


def _to_torch(array: np.ndarray, like: Tensor) -> Tensor:
    dtype = like.dtype if like.is_floating_point() else torch.float32
    return torch.as_tensor(np.ascontiguousarray(array)).to(device=like.device, dtype=dtype)


def normalize_gramian(gramian: Tensor, *, eps: float = 0.0) -> Tensor:
    """``G / mean(diag G)`` (so the mean squared gradient norm is 1); an all-zero Gramian (mean
    diagonal ``<= eps``) comes back as zeros.

    Example:
        >>> normalize_gramian(torch.tensor([[2.0, 1.0], [1.0, 6.0]]))
        tensor([[0.5000, 0.2500],
                [0.2500, 1.5000]])
    """
    _check_gramian(gramian)
    scale = gramian.diagonal().mean() if gramian.numel() else gramian.new_zeros(())
    safe = torch.where(scale > eps, scale, torch.ones_like(scale))
    return torch.where(scale > eps, gramian / safe, torch.zeros_like(gramian))


def _np_normalize(g: np.ndarray) -> np.ndarray:
    scale = float(np.mean(np.diag(g))) if g.size else 0.0
    if not scale > 0.0 or not math.isfinite(scale):
        return np.zeros_like(g)
    return g / scale


def nonnegative_qp(
    q: np.ndarray,
    c: np.ndarray,
    *,
    max_iter: int | None = None,
    tol: float = 1e-12,
) -> np.ndarray:
    """Solve ``min ½ xᵀQx + cᵀx`` subject to ``x >= 0`` exactly (float64 numpy).

    ``Q`` must be symmetric positive semi-definite and the objective bounded below on the
    orthant (true whenever ``c`` lies in the range of ``Q``). After a Jacobi scaling (unit
    diagonal), the method is a Lawson-Hanson-style
    primal active-set method: it frees the variable with the most negative gradient, takes a
    minimum-norm Newton step on the free set (``numpy.linalg.lstsq``, so a singular ``Q`` —
    duplicate or zero gradients — is handled: among the minimisers it moves the least), and backs
    off along the step when a variable would become negative. It stops when the KKT conditions
    ``y >= 0``, ``(Q'y + c') >= -tol·max|c'|`` and ``y_i (Q'y + c')_i = 0`` hold for the scaled
    problem (``Q' = DQD``, ``c' = Dc``, ``x = Dy``). Finite for every input; ``max_iter``
    (default ``10·K + 50``) bounds the number of free-set changes.

    Example:
        >>> nonnegative_qp(np.array([[2.0, 0.0], [0.0, 2.0]]), np.array([-2.0, 4.0]))
        array([1., 0.])
    """
    q = np.asarray(q, dtype=np.float64)
    c = np.asarray(c, dtype=np.float64).reshape(-1)
    k = c.shape[0]
    if q.shape != (k, k):
        raise ValueError(f"`q` should have shape ({k}, {k}), found {q.shape}")
    if k == 0:
        return np.zeros(0)
    # Jacobi scaling x = D y with D = diag(Q)^(-1/2): unit diagonal, so variables of very
    # different scales (gradient norms from 1e-4 to 1e4) are resolved to the same relative accuracy
    diag = np.diag(q).copy()
    d = np.where(diag > 0.0, 1.0 / np.sqrt(np.where(diag > 0.0, diag, 1.0)), 1.0)
    y = _nnqp_scaled(q * d[:, None] * d[None, :], c * d, max_iter=max_iter, tol=tol)
    return d * y


def _solve_psd(a: np.ndarray, b: np.ndarray, rcond: float) -> np.ndarray:
    """``a⁻¹ b`` for a well-conditioned PSD ``a`` (Cholesky test, then LU); otherwise the
    minimum-norm least-squares solution (SVD), which handles singular ``a``."""
    try:
        pivots = np.diag(np.linalg.cholesky(a))
        if pivots.min() > 1e-6 * pivots.max():  # condition number below ~1e12
            return np.linalg.solve(a, b)
    except np.linalg.LinAlgError:
        pass
    return np.linalg.lstsq(a, b, rcond=rcond)[0]


def _nnqp_scaled(q: np.ndarray, c: np.ndarray, *, max_iter: int | None, tol: float) -> np.ndarray:
    k = c.shape[0]
    x = np.zeros(k)
    scale = max(float(np.abs(c).max(initial=0.0)), _TINY)
    tol_abs = tol * scale
    rcond = 1e-13 * k
    free = np.zeros(k, dtype=bool)
    budget = max_iter if max_iter is not None else 10 * k + 50
    last_added = -1
    for _ in range(budget):
        grad = q @ x + c
        candidates = np.where(~free, grad, np.inf)
        j = int(np.argmin(candidates))
        if not candidates[j] < -tol_abs:
            break
        free[j] = True
        last_added = j
        for _inner in range(k + 1):
            idx = np.flatnonzero(free)
            if idx.size == 0:
                break
            sub = q[np.ix_(idx, idx)]
            g_free = q[idx] @ x + c[idx]
            step = -_solve_psd(sub, g_free, rcond)
            target = x[idx] + step
            blocking = target <= 0.0
            if not blocking.any():
                x[idx] = target
                break
            ratios = np.full(idx.size, np.inf)
            moving = blocking & (step < 0.0)
            ratios[moving] = x[idx][moving] / -step[moving]
            alpha = min(1.0, float(ratios.min(initial=np.inf)))
            x[idx] = np.maximum(x[idx] + alpha * step, 0.0)
            leaving = blocking & (ratios <= alpha * (1.0 + 1e-12) + _TINY)
            leaving |= x[idx] <= 0.0
            x[idx[leaving]] = 0.0
            free[idx[leaving]] = False
            if alpha == 0.0 and not free[last_added]:
                # numerically the freed variable cannot move: stop rather than cycle
                return x
    return x


def _min_norm_simplex_np(g: np.ndarray) -> np.ndarray:
    k = g.shape[0]
    if k == 1:
        return np.ones(1)
    g = _np_normalize(g)
    if not np.any(g):
        return np.full(k, 1.0 / k)
    if k == 2:
        # w1 = (G22 - G12) / (G11 + G22 - 2 G12), clipped to [0, 1]
        denom = g[0, 0] + g[1, 1] - 2.0 * g[0, 1]
        if denom <= 1e-15 * (g[0, 0] + g[1, 1]):
            return np.array([0.5, 0.5])
        w1 = float(np.clip((g[1, 1] - g[0, 1]) / denom, 0.0, 1.0))
        return np.array([w1, 1.0 - w1])
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
        >>> min_norm_simplex(torch.tensor([[1.0, -1.0], [-1.0, 1.0]]))   # g and -g: 0 in hull
        tensor([0.5000, 0.5000])
    """
    _check_gramian(gramian)
    k = gramian.shape[0]
    if k == 0:
        return gramian.new_zeros(0)
    g = _to_numpy(gramian)
    if k > 2 and (max_iter is not None or tol != 1e-12):
        g = _np_normalize(g)
        w = _min_norm_nnqp(g, max_iter=max_iter, tol=tol) if np.any(g) else np.full(k, 1.0 / k)
    else:
        w = _min_norm_simplex_np(g)
    return _to_torch(w, gramian)


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
    _check_gramian(gramian)
    k = gramian.shape[0]
    if u.shape[-1] != k or u.ndim not in (1, 2):
        raise ValueError(
            f"`u` should have shape ({k},) or (M, {k}) for a {k}×{k} Gramian, found "
            f"{tuple(u.shape)}"
        )
    g = _np_normalize(_to_numpy(gramian))
    u_np = u.detach().to("cpu", torch.float64).numpy().reshape(-1, k)
    v = _dual_cone_np(g, u_np) if k else u_np
    return _to_torch(v.reshape(tuple(u.shape)), gramian)


def _conflict_averse_np(
    g: np.ndarray, beta: np.ndarray, radius: float, *, iters: int = 60
) -> np.ndarray:
    """``argmin_{w ∈ Δ} wᵀGβ + radius·√(wᵀGw)`` on a normalised Gramian (see the torch API)."""
    k = g.shape[0]
    if k == 1:
        return np.ones(1)
    b = g @ beta
    vv = max(float(beta @ b), 0.0)

    def objective(w: np.ndarray) -> float:
        return float(w @ b + radius * math.sqrt(max(float(w @ g @ w), 0.0)))

    uniform = np.full(k, 1.0 / k)
    candidates = [uniform, *np.eye(k)]
    if radius <= 0.0:
        return min(candidates, key=objective)

    def inner(t: float) -> np.ndarray:
        # min_w <v, g_w> + radius ||g_w||² / (2t)  ==  min_w ||g_w + (t/radius) v||²
        a = t / radius
        shifted = g + a * (b[:, None] + b[None, :]) + a * a * vv
        return _min_norm_simplex_np(shifted)

    def phi(t: float) -> tuple[float, np.ndarray]:
        # φ(t) = min_w <v, g_w> + radius (||g_w||² / (2t) + t/2), convex in t, min F at t*
        w = inner(t)
        return float(w @ b + radius * (float(w @ g @ w) / (2 * t) + t / 2)), w

    hi = max(math.sqrt(max(float(np.max(np.diag(g))), 0.0)), 1e-12)
    lo = 1e-12 * hi
    # golden-section search in t on [lo, hi] (φ is convex)
    ratio = (math.sqrt(5.0) - 1.0) / 2.0
    x1, x2 = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    f1, w1 = phi(x1)
    f2, w2 = phi(x2)
    best = [w1, w2]
    for _ in range(iters):
        if f1 <= f2:
            hi, x2, f2, w2 = x2, x1, f1, w1
            x1 = hi - ratio * (hi - lo)
            f1, w1 = phi(x1)
            best.append(w1)
        else:
            lo, x1, f1, w1 = x1, x2, f2, w2
            x2 = lo + ratio * (hi - lo)
            f2, w2 = phi(x2)
            best.append(w2)
        if hi - lo <= 1e-13 * max(hi, 1e-12):
            break
    w = min(best[-4:], key=objective)
    # majorise-minimise polish: t <- ||g_w|| never increases the objective
    for _ in range(20):
        t = math.sqrt(max(float(w @ g @ w), 0.0))
        if t <= 1e-15:
            break
        nxt = inner(t)
        if objective(nxt) >= objective(w) - 1e-16:
            break
        w = nxt
    candidates.append(w)
    return min(candidates, key=objective)


def conflict_averse_simplex(gramian: Tensor, *, center: Tensor, radius: float) -> Tensor:
    """``argmin_{w ∈ Δ} wᵀGβ + s·√(wᵀGw)`` with ``β = center`` and ``s = radius``: the dual
    problem of CAGrad (Liu et al., NeurIPS 2021), ``min_w <g_0, g_w> + s ||g_w||`` with
    ``g_0 = βᵀJ`` and ``g_w = wᵀJ``; ``radius`` is in the units of J (a gradient norm, e.g.
    ``c ||g_0||``), and the weights are unchanged when ``G`` and ``radius²`` are scaled together.

    Exact up to ~1e-12: the objective equals ``min_{t > 0} φ(t)`` with
    ``φ(t) = s t/2 + min_w [<g_0, g_w> + s ||g_w||² / (2t)]``, convex in ``t``; each inner
    problem is a minimum-norm problem ``min_w ||g_w + (t/s) g_0||²`` over the simplex (points
    shifted by ``(t/s) g_0``, solved by ``min_norm_simplex``'s exact solver), ``t`` is found by
    golden-section search and polished by majorise-minimise steps ``t ← ||g_w||``. The uniform
    weights and the vertices are also tried; the best is returned. Runs on the CPU in float64.

    Example:
        >>> G = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # orthogonal unit gradients: symmetric
        >>> conflict_averse_simplex(G, center=torch.tensor([0.5, 0.5]), radius=0.2)
        tensor([0.5000, 0.5000])
    """
    _check_gramian(gramian)
    k = gramian.shape[0]
    if center.shape != (k,):
        raise ValueError(f"`center` should have shape ({k},), found {tuple(center.shape)}")
    if not radius >= 0.0:
        raise ValueError(f"`radius` should be >= 0, found {radius}")
    if k == 0:
        return gramian.new_zeros(0)
    g = _to_numpy(gramian)
    scale = float(np.mean(np.diag(g)))
    beta = center.detach().to("cpu", torch.float64).numpy()
    if not scale > 0.0 or not math.isfinite(scale):
        return _to_torch(np.full(k, 1.0 / k), gramian)
    w = _conflict_averse_np(g / scale, beta, float(radius) / math.sqrt(scale))
    return _to_torch(w, gramian)
