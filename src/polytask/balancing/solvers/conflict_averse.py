"""CAGrad's dual problem: ``argmin_{w ∈ Δ} wᵀGβ + s·√(wᵀGw)`` over the simplex."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from polytask.balancing.solvers._gramian import check_gramian, to_numpy, to_torch
from polytask.balancing.solvers.min_norm import min_norm_simplex_numpy


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
        return min_norm_simplex_numpy(shifted)

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


def _face_solution(
    cos: np.ndarray, a: np.ndarray, delta: np.ndarray, radius: float, face: list[int]
) -> tuple[float, np.ndarray] | None:
    """On the face ``face`` of the simplex, in the scaled variables ``y = ||g|| ⊙ w``: the
    stationary point of ``aᵀy + s √(yᵀCy)`` on ``δᵀy = 1`` (``C`` the cosine matrix, ``a_i =
    <u_i, g_0>``, ``δ = 1/||g||``, ``s`` the radius) solves ``(s/r) C y = λδ − a`` with
    ``r = ||g_w||``, so ``(s/r) y = λp − q`` (``p = C⁻¹δ``, ``q = C⁻¹a``) and ``λ`` is a root of
    ``(λδ − a)ᵀ C⁻¹ (λδ − a) = s²`` with ``λ δᵀp − δᵀq = s/r > 0``. Returns ``(λ, λp − q)``
    (the root of smaller objective), or ``None`` when the face has no such point."""
    c, d, b = cos[np.ix_(face, face)], delta[face], a[face]
    try:
        p, q = np.linalg.solve(c, d), np.linalg.solve(c, b)
    except np.linalg.LinAlgError:
        return None
    qa, qb, qc = float(d @ p), -2.0 * float(d @ q), float(b @ q) - radius * radius
    disc = qb * qb - 4.0 * qa * qc
    if not (qa > 0.0 and disc >= 0.0):
        return None
    best: tuple[float, np.ndarray] | None = None
    best_value = math.inf
    for lam in ((-qb + math.sqrt(disc)) / (2 * qa), (-qb - math.sqrt(disc)) / (2 * qa)):
        ratio = lam * float(d @ p) - float(d @ q)  # s / r
        if not ratio > 0.0:
            continue
        z = lam * p - q  # (s / r) y
        value = float(b @ z) / ratio + radius * radius / ratio  # aᵀy + s r
        if value < best_value:
            best, best_value = (lam, z), value
    return best


def _independent(cos: np.ndarray, face: list[int], i: int, tol: float) -> bool:
    """Whether gradient ``i`` is not (numerically) a combination of those of ``face``."""
    if not face:
        return True
    row = cos[np.ix_(face, [i])][:, 0]
    try:
        pivot = 1.0 - float(row @ np.linalg.solve(cos[np.ix_(face, face)], row))
    except np.linalg.LinAlgError:
        return False
    return pivot > tol


def conflict_averse_ascent(
    g: np.ndarray, beta: np.ndarray, radius: float, start: np.ndarray, *, dep_tol: float
) -> np.ndarray | None:
    """CAGrad's update coefficients ``(s / ||g_w||) w`` exactly, by a primal active-set method
    on the faces of the simplex started from the support of ``start`` (an approximate ``w``):
    each face is solved in closed form (``_face_solution``), a variable leaving the simplex is
    dropped, a violated multiplier ``μ_i = a_i + (C z)_i − λδ_i < 0`` brings its task in.
    Without dividing by ``||g_w||`` (computed from ``G`` it would lose its digits to
    cancellation when the gradient norms span orders of magnitude). Zero gradients get 0;
    ``None`` when no face with ``||g_w|| > 0`` is optimal (0 in the hull: exactly opposed
    gradients)."""
    n = np.sqrt(np.clip(np.diag(g), 0.0, None))
    live = np.flatnonzero(n > 0.0)
    if live.size == 0 or not radius > 0.0:
        return None
    nl = n[live]
    cos = g[np.ix_(live, live)] / np.outer(nl, nl)
    a, delta = (g[live] @ beta) / nl, 1.0 / nl
    face: list[int] = []
    for i in np.argsort(-start[live] * nl):
        if start[live][i] > 0.0 and _independent(cos, face, int(i), dep_tol):
            face.append(int(i))
    if not face:  # start on the zero gradient: from the best vertex <g_i, g_0> + s ||g_i||
        face.append(int(np.argmin(nl * (a + radius))))
    for _ in range(4 * live.size + 4):
        solved = _face_solution(cos, a, delta, radius, face) if face else None
        if solved is None:
            return None
        lam, z = solved
        if z.min() < 0.0:  # leave the simplex: drop the most negative
            face.pop(int(np.argmin(z)))
            continue
        mu = a + cos[:, face] @ z - lam * delta
        mu[face] = 0.0
        entering = int(np.argmin(mu / (np.abs(a) + radius)))
        if mu[entering] >= -1e-12 * (abs(a[entering]) + radius) or not _independent(
            cos, face, entering, dep_tol
        ):
            out = np.zeros(g.shape[0])
            out[live[face]] = z / nl[face]
            return out
        face.append(entering)
    return None


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
    check_gramian(gramian)
    k = gramian.shape[0]
    if center.shape != (k,):
        raise ValueError(f"`center` should have shape ({k},), found {tuple(center.shape)}")
    if not radius >= 0.0:
        raise ValueError(f"`radius` should be >= 0, found {radius}")
    if k == 0:
        return gramian.new_zeros(0)
    g = to_numpy(gramian)
    scale = float(np.mean(np.diag(g)))
    beta = center.detach().to("cpu", torch.float64).numpy()
    if not scale > 0.0 or not math.isfinite(scale):
        return to_torch(np.full(k, 1.0 / k), gramian)
    w = _conflict_averse_np(g / scale, beta, float(radius) / math.sqrt(scale))
    return to_torch(w, gramian)
