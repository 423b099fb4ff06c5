"""CAGrad's dual problem: ``argmin_{w ∈ Δ} wᵀGβ + s·√(wᵀGw)`` over the simplex."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from polytask.balancing.solvers._gramian import check_gramian, to_numpy, to_torch
from polytask.balancing.solvers.min_norm import min_norm_simplex_numpy

logger = logging.getLogger(__name__)


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


# ----------------------------------------------------------------------------- on the device
#: Newton steps of the barrier method (fixed: no decision on the host between them)
BARRIER_STEPS = 48
#: the barrier weight shrinks by this factor at each step, from ``F(1/K) / K`` to ~1e-16 of it
BARRIER_SHRINK = 0.45
#: active-set corrections of the face the barrier found (one member out or one task in each)
ACTIVE_SET_STEPS = 12
#: trial step lengths of the line search, as fractions of the longest feasible step
LINE_SEARCH_FRACTIONS = 18


def device_solve_dtype(device: torch.device) -> torch.dtype:
    """The dtype of the on-device solve: float64 where the device has it, float32 on MPS."""
    return torch.float32 if device.type == "mps" else torch.float64


def _scaled_problem(
    gramian: Tensor, center: Tensor, radius: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(C, a, δ, n, s, live)`` of the dual in the scaled variables ``y = n ⊙ w``: the cosine
    matrix ``C`` (identity rows for zero gradients), ``a_i = <u_i, g_0>``, ``δ = 1/n`` (0 for a
    zero gradient), the norms ``n`` and the radius ``s`` of ``G / mean(diag G)``."""
    g = torch.nan_to_num(0.5 * (gramian + gramian.mT), nan=0.0, posinf=0.0, neginf=0.0)
    scale = g.diagonal().mean()
    ok = scale > 0
    g = g / torch.where(ok, scale, torch.ones_like(scale))
    n = g.diagonal().clamp_min(0).sqrt()
    live = (n > 0) & ok
    safe = torch.where(live, n, torch.ones_like(n))
    eye = torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
    pair = live[:, None] & live[None, :]
    cos = torch.where(pair, g / (safe[:, None] * safe[None, :]), eye)
    a = torch.where(live, (g @ center) / safe, torch.zeros_like(n))
    delta = torch.where(live, 1.0 / safe, torch.zeros_like(n))
    s = radius / torch.where(ok, scale, torch.ones_like(scale)).sqrt()
    return cos, a, delta, n, s, live


def _barrier_values(
    y: Tensor, cos: Tensor, a: Tensor, s: Tensor, mu: Tensor, smooth: Tensor, live: Tensor
) -> Tensor:
    """``aᵀy + s √(yᵀCy + ε²) − μ Σ_live log y`` (``smooth = ε²``) for each row of ``y``
    ([M, K]); ``inf`` outside the positive orthant."""
    r = (((y @ cos) * y).sum(-1).clamp_min(0) + smooth).sqrt()
    inside = torch.where(live, y, torch.ones_like(y))
    logs = torch.where(live, inside.clamp_min(torch.finfo(y.dtype).tiny).log(), 0.0).sum(-1)
    value = y @ a + s * r - mu * logs
    feasible = (inside > 0).all(-1) & torch.isfinite(value)
    return torch.where(feasible, value, torch.full_like(value, math.inf))


def _newton_step(
    y: Tensor,
    cos: Tensor,
    a: Tensor,
    delta: Tensor,
    s: Tensor,
    mu: Tensor,
    smooth: Tensor,
    live: Tensor,
) -> Tensor:
    """One damped Newton step of the barrier problem on ``δᵀy = 1`` (the step keeps it), with
    ``||g_w||`` smoothed to ``√(yᵀCy + ε²)`` (``smooth = ε²``: Newton cannot cross the kink
    at ``g_w = 0``): the KKT system, scaled by its diagonal, solved without a host check, then
    the best of ``LINE_SEARCH_FRACTIONS`` step lengths (and 0) inside the positive orthant."""
    k = y.shape[0]
    cy = cos @ y
    r = ((y @ cy).clamp_min(0) + smooth).clamp_min(torch.finfo(y.dtype).tiny).sqrt()
    inside = torch.where(live, y, torch.ones_like(y))
    grad = torch.where(live, a + s * cy / r - mu / inside, 0.0)
    hess = s * (cos / r - torch.outer(cy, cy) / r**3) + torch.diag(mu / inside**2)
    pair = live[:, None] & live[None, :]
    eye = torch.eye(k, dtype=y.dtype, device=y.device)
    hess = torch.where(pair, hess, eye)
    kkt = torch.zeros(k + 1, k + 1, dtype=y.dtype, device=y.device)
    kkt[:k, :k] = hess
    kkt[:k, k] = delta
    kkt[k, :k] = delta
    rhs = torch.cat([-grad, grad.new_zeros(1)])
    d = torch.cat([hess.diagonal().abs(), delta.abs().max(0, keepdim=True).values])
    d = torch.where(d > 0, d, torch.ones_like(d)).rsqrt()
    solution, _ = torch.linalg.solve_ex(kkt * d[:, None] * d[None, :], rhs * d)
    step = torch.where(live, torch.nan_to_num(solution[:k] * d[:k], nan=0.0), 0.0)
    shrink = torch.where(step < 0, -inside / step.clamp_max(-torch.finfo(y.dtype).tiny), math.inf)
    longest = (0.995 * shrink.min()).clamp_max(1.0)
    fractions = 0.5 ** torch.arange(LINE_SEARCH_FRACTIONS, dtype=y.dtype, device=y.device)
    lengths = torch.cat([longest * fractions, fractions.new_zeros(1)])
    trials = y + lengths[:, None] * step
    best = _barrier_values(trials, cos, a, s, mu, smooth, live).argmin()
    return trials.index_select(0, best.reshape(1))[0]  # a tensor index: no host read


def _face_coefficients(
    cos: Tensor, a: Tensor, delta: Tensor, s: Tensor, face: Tensor, live: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """``_face_solution`` on the face ``face`` (a mask), with every branch a ``torch.where``:
    ``z = (s/r) y`` and whether it is CAGrad's optimum (a real root with ``s/r > 0``, ``z >= 0``
    on the face and every multiplier ``a_i + (Cz)_i − λδ_i`` off it ``>= −1e-10`` of its
    terms), and the face of the next active-set step (one member out or one task in).
    Duplicated gradients (cosine ``> 1 − 1e-10``) keep their first copy only."""
    k = cos.shape[0]
    copies = torch.triu(cos > 1.0 - 1e-10, diagonal=1) & face[:, None]
    face = face & ~copies.any(0)
    f = face.to(cos.dtype)
    eye = torch.eye(k, dtype=cos.dtype, device=cos.device)
    restricted = cos * f[:, None] * f[None, :] + eye * (1.0 - f)
    solved, info = torch.linalg.solve_ex(restricted, torch.stack([delta * f, a * f], 1))
    p, q = solved[:, 0] * f, solved[:, 1] * f
    qa, qb, qc = delta @ p, -2.0 * (delta @ q), a @ q - s * s
    disc = qb * qb - 4.0 * qa * qc
    root = disc.clamp_min(0).sqrt()
    lams = torch.stack([(-qb + root) / (2 * qa), (-qb - root) / (2 * qa)])  # [2]
    ratios = lams * (delta @ p) - delta @ q  # s / r for each root
    zs = lams[:, None] * p - q  # [2, K]
    values = (zs @ a + s * s) / ratios
    mult = a + zs @ cos - lams[:, None] * delta
    size = a.abs() + s + (lams[:, None] * delta).abs() + (zs @ cos).abs()
    off = live & ~face
    valid = (
        (info == 0)
        & (qa > 0)
        & (disc >= 0)
        & (ratios > 0)
        & torch.where(face, zs >= 0, True).all(1)
        & torch.where(off, mult >= -1e-10 * size, True).all(1)
        & torch.isfinite(values)
        & torch.isfinite(zs).all(1)
    )
    inf = torch.full_like(values, math.inf)
    pick = torch.where(valid, values, inf).argmin().reshape(1)
    z = zs.index_select(0, pick)[0]
    # the next face, should this one be wrong: without its most negative (or, solve failed, its
    # first) member, else with the task of the most violated multiplier
    solvable = (info == 0) & (qa > 0) & (disc >= 0) & torch.isfinite(zs).all(1) & (ratios > 0)
    best = torch.where(solvable, torch.nan_to_num(values, nan=math.inf), inf).argmin().reshape(1)
    zb, mb, sb = (t.index_select(0, best)[0] for t in (zs, mult, size))
    usable = solvable.any()
    score = torch.where(face, torch.where(usable, zb, 0.0), math.inf)
    drop = (score.min() < 0) | ~usable
    enter = torch.where(off, mb / sb, math.inf)
    leaving = torch.nn.functional.one_hot(score.argmin(), k).bool()
    entering = torch.nn.functional.one_hot(enter.argmin(), k).bool() & (enter.min() < 0)
    nxt = torch.where(drop, face & ~leaving, face | entering)
    return z, valid.index_select(0, pick)[0], nxt


def conflict_averse_coefficients(
    gramian: Tensor, *, center: Tensor, radius: Tensor | float
) -> Tensor:
    """CAGrad's ``(s / ||g_w||) w`` (``w`` the minimiser of ``conflict_averse_simplex``) in torch
    on the Gramian's device, with a fixed budget of work and no value read on the host, so it
    runs without a host synchronisation on CUDA (float64; float32 on MPS).

    A primal log-barrier method in the scaled variables ``y = ||g|| ⊙ w`` (``BARRIER_STEPS``
    damped Newton steps on ``aᵀy + s √(yᵀCy + ε²) − μ Σ log y`` over ``δᵀy = 1``, ``μ`` and
    ``ε`` shrinking geometrically to ~1e-16 of their start), then the exact closed form on the
    face the barrier found (``_face_solution``'s, computed without dividing by ``||g_w||``),
    corrected by up to ``ACTIVE_SET_STEPS`` active-set steps, kept where its optimality
    conditions hold, else the barrier's own point (accurate to ~1e-8 only). Zero gradients get 0;
    ``radius <= 0`` or 0 in the hull of the gradients (exactly opposed ones) give all zeros,
    as ``conflict_averse_ascent`` does. ``radius`` (a gradient norm) may be a 0-dim tensor on the
    device, so that computing it needs no host read either.

    Agreement: the update ``(β + out)ᵀJ`` equals the NumPy solver's to ``1e-12·Σ_i |w_i| ||g_i||``
    in float64 on the hard zoo (norms 1e-4..1e4 in one matrix, zero, duplicated and
    near-opposite rows, K from 2 to 40, P from 5 to 1000 — K > P included; c from 0.1 to 0.8),
    measured at ~1e-15 (``tests/balancing/test_cagrad_device.py``); a float32 Gramian is solved
    in float64 and rounded back. Not covered: MPS (float32 solve, untested here).

    Example:
        >>> G = torch.eye(2, dtype=torch.float64)  # orthogonal unit gradients: w = (1/2, 1/2)
        >>> conflict_averse_coefficients(G, center=torch.full((2,), 0.5), radius=0.2)
        tensor([0.1414, 0.1414], dtype=torch.float64)

        (``||g_w|| = 1/√2``, so ``(s / ||g_w||) w = 0.2 √2 / 2``.)
    """
    check_gramian(gramian)
    dtype = device_solve_dtype(gramian.device)
    g = gramian.detach().to(dtype)
    beta = center.detach().to(device=g.device, dtype=dtype)
    s0 = torch.as_tensor(radius, dtype=dtype, device=g.device)
    if g.shape[0] == 0:
        return gramian.new_zeros(0)
    out = _graphed(g, beta, s0) if g.is_cuda else _coefficients(g, beta, s0)
    return out.to(gramian.dtype if gramian.is_floating_point() else torch.float32)


#: on CUDA, fuse each Newton step and each active-set step with ``torch.compile`` before
#: capturing the graph (a few kernels each instead of ~100; compiled once per K, ~10-30 s)
COMPILE_ON_CUDA = True

#: one captured CUDA graph of ``_coefficients`` per (device, K, dtype, compiled), ``None``
#: where capture failed (then the same work runs eagerly, still without a host synchronisation)
_CUDA_GRAPHS: dict[tuple[torch.device, int, torch.dtype, bool], tuple[Any, ...] | None] = {}
_COMPILED: dict[str, Callable[..., Any]] = {}


def _graphed(g: Tensor, beta: Tensor, radius: Tensor, *, compiled: bool | None = None) -> Tensor:
    """``_coefficients`` replayed from a CUDA graph: its small kernels cost one launch
    (captured on first use for this K, after a warm-up on a side stream), the steps fused by
    ``torch.compile`` when ``compiled`` (default ``COMPILE_ON_CUDA``)."""
    compiled = COMPILE_ON_CUDA if compiled is None else compiled
    key = (g.device, g.shape[0], g.dtype, compiled)
    if key not in _CUDA_GRAPHS:
        _CUDA_GRAPHS[key] = _capture(g, beta, radius, compiled=compiled)
        if _CUDA_GRAPHS[key] is None and compiled:  # not compilable here: the plain graph
            _CUDA_GRAPHS[key] = _capture(g, beta, radius, compiled=False)
    entry = _CUDA_GRAPHS[key]
    if entry is None:
        return _coefficients(g, beta, radius)
    graph, static_g, static_beta, static_radius, static_out = entry
    static_g.copy_(g)
    static_beta.copy_(beta)
    static_radius.copy_(radius)
    graph.replay()
    return static_out.clone()


def _steps(compiled: bool) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """``(_newton_step, _face_coefficients)``, compiled (static shapes, one graph) or not."""
    if not compiled:
        return _newton_step, _face_coefficients
    if not _COMPILED:
        _COMPILED["newton"] = torch.compile(_newton_step, dynamic=False, fullgraph=True)
        _COMPILED["face"] = torch.compile(_face_coefficients, dynamic=False, fullgraph=True)
    return _COMPILED["newton"], _COMPILED["face"]


def _capture(g: Tensor, beta: Tensor, radius: Tensor, *, compiled: bool) -> tuple[Any, ...] | None:
    inputs = (g.clone(), beta.clone(), radius.clone())
    newton, face = _steps(compiled)
    try:
        side = torch.cuda.Stream(g.device)
        side.wait_stream(torch.cuda.current_stream(g.device))
        with torch.cuda.stream(side):  # warm-up (and compilation) outside the capture
            _coefficients(*inputs, newton_step=newton, face_step=face)
        torch.cuda.current_stream(g.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            out = _coefficients(*inputs, newton_step=newton, face_step=face)
    except Exception as error:  # any failure to compile or capture: the next way down
        logger.warning(
            "CAGrad's dual solve: no %s CUDA graph for K=%d (%s: %s); it runs %s",
            "compiled" if compiled else "plain",
            g.shape[0],
            type(error).__name__,
            str(error).splitlines()[0] if str(error) else "",
            "from the plain graph" if compiled else "eagerly",
        )
        return None
    return (graph, *inputs, out)


def _coefficients(
    g: Tensor,
    beta: Tensor,
    radius: Tensor,
    *,
    newton_step: Callable[..., Any] = _newton_step,
    face_step: Callable[..., Any] = _face_coefficients,
) -> Tensor:
    """The work of ``conflict_averse_coefficients`` on float ``g``, ``beta`` and ``radius``
    (``newton_step`` and ``face_step``: the two steps, compiled or not)."""
    dtype = g.dtype
    cos, a, delta, n, s, live = _scaled_problem(g, beta, radius)
    count = live.sum().clamp_min(1).to(dtype)
    y = torch.where(live, n / count, 0.0)  # w uniform over the non-zero gradients
    start = (y @ a).abs() + s * ((y @ cos) @ y).clamp_min(0).sqrt()
    mu = (start + torch.finfo(dtype).tiny) / count
    r0_squared = ((y @ cos) @ y).clamp_min(0)  # the smoothing ε shrinks like μ, from ||g_0||
    floor = BARRIER_STEPS - 3  # the last steps centre at the final weight
    for i in range(BARRIER_STEPS):
        shrink = BARRIER_SHRINK ** min(i, floor)
        y = newton_step(y, cos, a, delta, s, mu * shrink, r0_squared * shrink**2, live)
    final = mu * BARRIER_SHRINK**floor
    safe = torch.where(live, n, torch.ones_like(n))
    w = y / safe
    # the face: tasks whose barrier multiplier μ/y_i is small against its terms |a_i| + s + |λ|δ_i
    # (λ ≈ aᵀy + s||g_w||, the objective), at ~√(final relative μ) ≈ 1e-8, or whose w_i y_i
    # is well above μ (each test alone misses members on some of the hard cases)
    lam = (y @ a).abs() + s * ((y @ cos) @ y).clamp_min(0).sqrt()
    scale = a.abs() + s + lam * delta
    face = live & (
        (final < 1e-8 * scale * torch.where(live, y, torch.zeros_like(y))) | (w * y > 100 * final)
    )
    z, exact = w.new_zeros(w.shape), torch.zeros((), dtype=torch.bool, device=w.device)
    for _ in range(ACTIVE_SET_STEPS):  # keep the first face whose conditions hold
        found, ok, face = face_step(cos, a, delta, s, face, live)
        z = torch.where(exact, z, found)
        exact = exact | ok
    r = ((y @ cos) @ y).clamp_min(0).sqrt()
    opposed = r <= 1e-8 * (y @ delta)  # ||g_w|| ≈ 0: 0 is in the hull
    barrier = torch.where(opposed, 0.0, s * w / r.clamp_min(torch.finfo(dtype).tiny))
    out = torch.where(exact, z / safe, barrier)
    return torch.where(live & (s > 0), out, 0.0)
