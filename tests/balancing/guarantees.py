"""The hard zoo of Jacobians and, for every gradient method, a check of its stated numerical
guarantee (the property its docstring promises, to the tolerance it states).

The zoo (fixed seeds): K in (2, 3, 5, 10) rows, P in (10, 100, 1000) columns, of the kinds
``random``, ``norms_up`` / ``norms_down`` (row norms 1e-4 … 1e4 in one matrix, increasing and
decreasing), ``zero_row``, ``duplicates``, ``opposed`` (pairs with cosine < −0.9) and ``mixed``
(norms 1e-4 … 1e4 with a near-opposite pair and a duplicate), built in float64 and rounded to the
dtype under test. Every check works in float64 on the rounded Jacobian and returns the worst
violation divided by the method's stated tolerance (``<= 1``: the guarantee holds). Shared with
``scripts``-style measurements (``python tests/balancing/guarantees.py`` prints the figures).

Not collected by pytest (the name does not start with ``test_``).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import Tensor

from polytask.balancing import BALANCERS
from polytask.balancing.aggregation._graddrop import seeded_generator

HARD_KINDS = ["random", "norms_up", "norms_down", "zero_row", "duplicates", "opposed", "mixed"]
HARD_K = (2, 3, 5, 10)
HARD_P = (10, 100, 1000)


def hard_jacobian(kind: str, k: int, p: int, seed: int = 0) -> Tensor:
    """A K×P float64 Jacobian of one of ``HARD_KINDS`` (see the module docstring)."""
    gen = torch.Generator().manual_seed(1000 * k + p + 7 * seed + HARD_KINDS.index(kind))
    base = torch.randn(k, p, generator=gen, dtype=torch.float64)
    spread = torch.logspace(-4, 4, k, dtype=torch.float64)[:, None]
    if kind in ("norms_up", "mixed"):
        base = base / base.norm(dim=1, keepdim=True) * spread
    elif kind == "norms_down":
        base = base / base.norm(dim=1, keepdim=True) * spread.flip(0)
    elif kind == "zero_row":
        base[k // 2] = 0.0
    elif kind == "duplicates":
        base[1] = base[0]
        if k >= 5:
            base[3] = base[2]
            base[4] = base[2]
    elif kind == "opposed":
        signs = torch.tensor([(-1.0) ** i for i in range(k)], dtype=torch.float64)
        sizes = torch.linspace(1.0, 2.0, k, dtype=torch.float64)
        base = (signs * sizes)[:, None] * base[0] / base[0].norm() + 0.02 * base / p**0.5
    if kind == "mixed":
        # row 1 nearly opposite to row 0 at its own scale, the last row a copy of row k // 2
        direction = base[0] / base[0].norm()
        base[1] = -float(spread[1]) * (direction + 0.1 * base[1] / base[1].norm())
        base[1] = base[1] / base[1].norm() * float(spread[1])
        if k >= 3:
            base[-1] = base[k // 2]
    return base


def hard_cases() -> Iterator[tuple[str, int, int]]:
    yield from itertools.product(HARD_KINDS, HARD_K, HARD_P)


# --------------------------------------------------------------------------- helpers
def _norms(j: np.ndarray) -> np.ndarray:
    return np.linalg.norm(j, axis=1)


def _live(j: np.ndarray) -> np.ndarray:
    return _norms(j) > 0.0


def unit_roundoff(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).eps)


# --------------------------------------------------------------------------- checks
# Each check: (J float64 numpy, update, weights, method, dtype) -> worst violation / tolerance.
Check = Callable[[np.ndarray, np.ndarray, np.ndarray, torch.nn.Module, torch.dtype], float]


def check_min_norm(
    j: np.ndarray, d: np.ndarray, w: np.ndarray, agg: object, dt: torch.dtype
) -> float:
    """MGDA: ``w`` on the simplex and ``<g_i, d> >= ||d||²`` for every task (the KKT conditions
    of the min-norm point), to ``20·K·eps · ||g_i|| · Σ_k w_k ||g_k||``."""
    n, eps = _norms(j), unit_roundoff(dt)
    scale = float(np.abs(w) @ n)
    tol = 20 * len(n) * eps
    simplex = max(float(-w.min()), abs(float(w.sum()) - 1.0)) / tol
    gap = (d @ d - j @ d) / np.maximum(n * scale, 1e-300)
    return max(simplex, float(gap.max()) / tol)


def check_no_conflict(
    j: np.ndarray, d: np.ndarray, w: np.ndarray, agg: object, dt: torch.dtype
) -> float:
    """UPGrad, DualProj: ``<g_i, d> >= 0`` for every task, to ``20·K·eps·||g_i||·Σ|w_k| ||g_k||``;
    DualProj's weights are at least the preference ``1/K``."""
    n, eps = _norms(j), unit_roundoff(dt)
    scale = float(np.abs(w) @ n)
    tol = 20 * len(n) * eps
    worst = float((-(j @ d) / np.maximum(n * scale, 1e-300)).max()) / tol
    if type(agg).__name__ == "DualProj":
        worst = max(worst, float((1.0 / len(n) - w).max()) / tol)
    return worst


def check_bargaining(
    j: np.ndarray, d: np.ndarray, w: np.ndarray, agg: object, dt: torch.dtype
) -> float:
    """Nash-MTL, FairGrad (α = 1): ``α_i (Gα)_i = 1`` on the raw Gramian for every task with a
    non-zero gradient, with the reported weights ``f·α`` clipped to ``max_norm = 1``
    (``‖αᵀJ‖ = √K`` at the solution, so ``f = 1 / (√K + 1e-6)``), to
    ``1e-9 + 50·K·eps·α_i‖g_i‖ Σ_k α_k‖g_k‖``; a zero gradient gets the largest weight."""
    worst = _bargaining(j, w, 1.0 / (math.sqrt(int(_live(j).sum())) + 1e-6), dt)
    # the equation itself, unclipped (max_norm = 0): α, not only its direction
    tasks = [f"t{i}" for i in range(j.shape[0])]
    free = type(agg)(tasks, max_norm=0.0)
    _, raw = free.aggregate(torch.from_numpy(j).to(dt), torch.ones(j.shape[0], dtype=dt))
    return max(worst, _bargaining(j, raw.double().numpy(), 1.0, dt))


def _bargaining(j: np.ndarray, w: np.ndarray, f: float, dt: torch.dtype) -> float:
    n, eps = _norms(j), unit_roundoff(dt)
    live = n > 0
    alpha = w / f
    if not np.all(alpha[live] > 0):
        return math.inf
    g = j[live] @ j[live].T
    a = alpha[live]
    residual = np.abs(a * (g @ a) - 1.0)
    scale = a * n[live] * float(a @ n[live])
    worst = float((residual / (1e-9 + 50 * len(n) * eps * scale)).max())
    if not live.all():
        worst = max(worst, abs(float(w[~live].max()) / float(w[live].max()) - 1.0) / 1e-12)
    return worst


def check_equal_projections(
    j: np.ndarray, d: np.ndarray, w: np.ndarray, agg: object, dt: torch.dtype
) -> float:
    """IMTL-G: ``Σ α = 1`` and ``<d, g_i / ||g_i||>`` equal for every non-zero gradient, to
    ``100·K·eps·Σ|α_k| ||g_k||``."""
    n, eps = _norms(j), unit_roundoff(dt)
    live = n > 0
    scale = float(np.abs(w) @ n)
    tol = 100 * len(n) * eps
    proj = (j[live] @ d) / n[live]
    return max(abs(float(w.sum()) - 1.0) / tol, float(proj.max() - proj.min()) / (tol * scale))


def _accurate_svd(j: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``J = U S Vᵀ`` to high relative accuracy in every singular value (LAPACK's preconditioned
    Jacobi SVD on ``Jᵀ``, whose columns carry the row scales)."""
    from scipy.linalg import lapack

    out = lapack.dgejsv(np.asfortranarray(j.T), joba=1)
    return out[2], out[0] * out[3][0] / out[3][1], out[1]


def check_aligned(
    j: np.ndarray, d: np.ndarray, w: np.ndarray, agg: object, dt: torch.dtype
) -> float:
    """Aligned-MTL (``scale_mode="min"``): the update is ``σ 1ᵀ U Vᵀ`` for ``J = U S Vᵀ`` (the
    sum of the aligned gradients, whose singular values all equal ``σ = min S``), to
    ``100·K·√P·eps·κ·σ√R`` (κ: the condition number of the rows' cosine matrix, R the rank;
    √P: the rounding of the Gramian ``J Jᵀ`` itself)."""
    n, eps = _norms(j), unit_roundoff(dt)
    live = n > 0
    jl = j[live]
    u, s, v = _accurate_svd(jl)
    cos = (jl @ jl.T) / np.outer(n[live], n[live])
    theta = np.linalg.eigvalsh(cos)
    rank = int((theta > len(n) * eps * theta.max()).sum())
    s, u, v = s[:rank], u[:, :rank], v[:, :rank]
    sigma = float(s.min())
    reference = sigma * (u.sum(axis=0) @ v.T)
    kappa = float(theta.max() / theta[theta > len(n) * eps * theta.max()].min())
    tol = 100 * len(n) * math.sqrt(j.shape[1]) * eps * kappa * sigma * math.sqrt(rank)
    return float(np.linalg.norm(d - reference)) / tol


def _cagrad_value(j: np.ndarray, c: float) -> float:
    """``max_{‖d − g0‖ <= c‖g0‖} min_i <g_i, d>`` exactly, as the dual ``min_{w ∈ Δ} <g0, g_w>
    + s ||g_w||`` (``s = c ||g0||``) minimised face by face of the simplex: on the face S, the
    stationary points solve ``a + s C y / r = λ δ`` in the scaled variables ``w = y / ||g||``
    (``C`` the cosine matrix, ``a_i = <u_i, g0>``, ``δ = 1/||g||``), a quadratic in λ. Zero and
    duplicated rows are dropped first (a zero row caps the value at 0)."""
    g0 = j.mean(axis=0)
    s = c * float(np.linalg.norm(g0))
    n = _norms(j)
    rows = np.unique(j[n > 0], axis=0)
    cap = 0.0 if (n == 0).any() else math.inf
    nn = _norms(rows)
    units = rows / nn[:, None]
    cos, a, delta = units @ units.T, units @ g0, 1.0 / nn
    best = cap
    for size in range(1, len(nn) + 1):
        for face in itertools.combinations(range(len(nn)), size):
            f = list(face)
            try:
                cinv = np.linalg.inv(cos[np.ix_(f, f)])
            except np.linalg.LinAlgError:
                continue
            p, q = cinv @ delta[f], cinv @ a[f]
            qa, qb, qc = delta[f] @ p, -2 * (delta[f] @ q), a[f] @ q - s * s
            disc = qb * qb - 4 * qa * qc
            if disc < 0 or qa <= 0:
                continue
            for lam in ((-qb + math.sqrt(disc)) / (2 * qa), (-qb - math.sqrt(disc)) / (2 * qa)):
                denom = lam * (delta[f] @ p) - delta[f] @ q
                if denom <= 0:
                    continue
                y = (lam * p - q) / denom
                if (y < -1e-12 * np.abs(y).max()).any():
                    continue
                y = np.clip(y, 0.0, None)
                y = y / (delta[f] @ y)
                gw = y @ units[f]
                best = min(best, float(g0 @ gw + s * np.linalg.norm(gw)))
    return best


def check_cagrad(
    j: np.ndarray, d: np.ndarray, w: np.ndarray, agg: object, dt: torch.dtype
) -> float:
    """CAGrad (``c = 0.4``, ``rescale = 1``): ``d' = (1 + c²) d`` lies in the ball
    ``‖d' − g0‖ <= c‖g0‖`` and ``min_i <g_i, d'>`` equals the exact optimum, to
    ``100·K·eps·‖d'‖·max_{i active} ||g_i||``."""
    c = 0.4
    n, eps = _norms(j), unit_roundoff(dt)
    tol = 100 * len(n) * eps
    dd = d * (1 + c * c)
    g0 = j.mean(axis=0)
    radius = c * float(np.linalg.norm(g0))
    outside = (float(np.linalg.norm(dd - g0)) - radius) / (tol * max(radius, 1e-300))
    exact = _cagrad_value(j, c)
    values = j @ dd
    active = values <= exact + 1e-3 * np.abs(values).max()
    scale = float(np.linalg.norm(dd)) * float(n[active].max(initial=0.0))
    shortfall = (exact - float(values.min())) / max(tol * scale, 1e-300)
    return max(outside, shortfall)


def _pcgrad_reference(j: np.ndarray, orders: list[list[int]]) -> np.ndarray:
    """PCGrad's Algorithm 1 on the rows themselves (float64)."""
    total = np.zeros(j.shape[1])
    for i, order in enumerate(orders):
        gi = j[i].copy()
        for jj in order:
            inner = float(gi @ j[jj])
            if inner < 0 and float(j[jj] @ j[jj]) > 0:
                gi -= inner / float(j[jj] @ j[jj]) * j[jj]
        total += gi
    return total


def check_pcgrad(
    j: np.ndarray, d: np.ndarray, w: np.ndarray, agg: object, dt: torch.dtype
) -> float:
    """PCGrad: the update is Algorithm 1 run on the rows (same orders), to
    ``50·K²·eps·Σ||g_i||``; with K = 2 no task conflicts with it (``<g_i, d> >= −tol·||g_i||``)."""
    from polytask.balancing.aggregation._pcgrad import PCGrad

    k, eps = j.shape[0], unit_roundoff(dt)
    twin = PCGrad([f"t{i}" for i in range(k)])
    orders = twin.draw_orders(k).tolist()
    n = _norms(j)
    tol = 50 * k * k * eps * float(n.sum())
    worst = float(np.linalg.norm(d - _pcgrad_reference(j, orders))) / tol
    if k == 2:
        worst = max(worst, float((-(j @ d) / np.maximum(n, 1e-300)).max()) / tol)
    return worst


def check_gradvac(
    j: np.ndarray, d: np.ndarray, w: np.ndarray, agg: object, dt: torch.dtype
) -> float:
    """GradVac (first step: targets 0): the update is the paper's correction run on the rows
    (same orders), to ``50·K²·eps·Σ_i ||g_i'||``; every corrected pair meets its target."""
    k, eps = j.shape[0], unit_roundoff(dt)
    rng = np.random.default_rng([0, 0])
    orders = [rng.permutation(k).tolist() for _ in range(k)]
    total, mass = np.zeros(j.shape[1]), 0.0
    n = _norms(j)
    for i in range(k):
        gi = j[i].copy()
        for jj in orders[i]:
            if jj == i or n[jj] == 0 or not np.any(gi):
                continue
            phi = float(gi @ j[jj]) / (np.linalg.norm(gi) * n[jj])
            if phi < 0.0:  # target 0: remove the conflicting component, cos becomes 0
                gi = gi - float(gi @ j[jj]) / n[jj] ** 2 * j[jj]
        total += gi
        mass += float(np.linalg.norm(gi)) + n[i]
    return float(np.linalg.norm(d - total)) / (50 * k * k * eps * mass)


def check_graddrop(
    j: np.ndarray, d: np.ndarray, w: np.ndarray, agg: object, dt: torch.dtype
) -> float:
    """GradDrop (leak 0): every coordinate is exactly the sum of the positive or of the negative
    components, the one the seeded draw and the sign purity pick (ties within rounding aside),
    to ``K·eps·Σ_i |g_ip|``."""
    eps = unit_roundoff(dt)
    pos, neg = np.clip(j, 0, None).sum(0), np.clip(j, None, 0).sum(0)
    mass = np.abs(j).sum(0)
    purity = 0.5 * (1 + np.where(mass > 0, j.sum(0) / np.where(mass > 0, mass, 1), 0))
    uniform = torch.rand(j.shape[1], generator=seeded_generator(0, 0, "cpu")).double().numpy()
    clear = np.abs(uniform - purity) > 1e-5
    expected = np.where(uniform < purity, pos, neg)
    err = np.abs(d - expected) / np.maximum(j.shape[0] * eps * mass, 1e-300)
    return float(err[clear].max(initial=0.0))


def check_dbmtl(j: np.ndarray, d: np.ndarray, w: np.ndarray, agg: object, dt: torch.dtype) -> float:
    """DB-MTL (first step, EMA ĝ = 0.1 g): ``d = Σ_i (max_j ||ĝ_j|| / ||ĝ_i||) ĝ_i``, every
    non-zero task scaled to the largest norm, to ``20·K·eps·K·max_j ||ĝ_j||``."""
    k, eps = j.shape[0], unit_roundoff(dt)
    ema = 0.1 * j
    n = _norms(ema)
    live = n > 0
    top = float(n.max())
    expected = ((top / n[live])[:, None] * ema[live]).sum(0)
    return float(np.linalg.norm(d - expected)) / (20 * k * eps * k * top)


CHECKS: dict[str, Check] = {
    "mgda": check_min_norm,
    "mgda_ub": check_min_norm,
    "pcgrad": check_pcgrad,
    "cagrad": check_cagrad,
    "nash_mtl": check_bargaining,
    "imtl_g": check_equal_projections,
    "aligned_mtl": check_aligned,
    "upgrad": check_no_conflict,
    "dualproj": check_no_conflict,
    "gradvac": check_gradvac,
    "graddrop": check_graddrop,
    "db_mtl": check_dbmtl,
    "fairgrad": check_bargaining,
}


def violation(name: str, kind: str, k: int, p: int, dtype: torch.dtype) -> float:
    """The worst violation / tolerance of ``name``'s guarantee on one zoo case (fresh instance,
    default hyper-parameters, one ``aggregate`` call)."""
    j = hard_jacobian(kind, k, p).to(dtype)
    agg = BALANCERS.get(name)([f"t{i}" for i in range(k)])
    update, weights = agg.aggregate(j, torch.ones(k, dtype=dtype))
    j64 = j.double().numpy()
    return CHECKS[name](j64, update.double().numpy(), weights.double().numpy(), agg, dtype)


if __name__ == "__main__":  # the figures of the report: worst violation per method and dtype
    for method in CHECKS:
        for dtype in (torch.float64, torch.float32):
            worst = max((violation(method, *case, dtype), case) for case in hard_cases())
            print(f"{method:12s} {dtype!s:14s} worst {worst[0]:10.3g} at {worst[1]}")
