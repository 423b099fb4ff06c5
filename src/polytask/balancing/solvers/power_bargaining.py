"""The power-bargaining weights: the positive ``w`` with ``G w = w^{-power}`` element-wise
(Nash-MTL is ``power = 1``, FairGrad ``power = 1/alpha``), by damped Newton on a strictly convex
potential, with SciPy's ``least_squares`` as a fallback."""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from torch import Tensor

#: a task whose squared gradient norm is below this fraction of the largest one is treated as
#: having a zero gradient (it has no finite bargaining weight)
ZERO_ROW_TOL = 1e-20


def _potential_change(
    a: np.ndarray, w: np.ndarray, step: np.ndarray, t: float, power: float
) -> float:
    """``f(w + t·step) − f(w)`` for ``f(w) = ½ wᵀAw − Σ h(w_i)`` with ``h' = w^{-power}``
    (``h = log`` when ``power = 1``), computed term by term so that small decreases are not lost
    to rounding."""
    quad = t * float(w @ a @ step) + 0.5 * t * t * float(step @ a @ step)
    x = np.log1p(t * step / w)
    if power == 1.0:
        return quad - float(x.sum())
    return quad - float((w ** (1.0 - power) * np.expm1((1.0 - power) * x)).sum() / (1.0 - power))


def _relative_residual(a: np.ndarray, w: np.ndarray, power: float) -> float:
    """``max_i |(A w)_i · w_i^power − 1|``: zero exactly at the solution, scale-free."""
    with np.errstate(all="ignore"):
        res = np.abs((a @ w) * w**power - 1.0)
    return float(res.max()) if np.isfinite(res).all() else math.inf


def solve_power_bargaining(
    gramian: np.ndarray | Tensor,
    power: float = 1.0,
    *,
    max_iter: int = 100,
    tol: float = 1e-10,
    reg: float = 1e-8,
) -> np.ndarray:
    """The weights ``w > 0`` with ``(G w)_i = w_i^{-power}`` for every task ``i``.

    ``w`` is the unique minimiser of the strictly convex ``f(w) = ½ wᵀ G w − Σ h(w_i)`` with
    ``h'(w) = w^{-power}`` (``power > 0``), found by Newton's method with a backtracking line
    search that keeps ``w > 0``. The start is exact when the gradients are orthogonal
    (``w_i = G_ii^{-1/(1+power)}``), rescaled along the ray to the best multiple.

    Exact: the equation is solved for ``G`` itself, to ``max_i |w_i^power (G w)_i − 1| < tol``
    (float64), whenever it has a solution — duplicated or near-opposite gradients included. A
    solution exists only when no non-negative combination of the gradients vanishes; only when
    Newton cannot reach ``tol`` on ``G`` (exactly opposed gradients, or a Gramian made slightly
    indefinite by rounding) is the equation solved for ``G + reg · Diag(G)`` instead (a relative
    ridge, each task regularised at its own scale; the relative residual it leaves is about
    ``reg``). A fixed ridge would leave that residual on every Gramian (4e-6 was measured on
    well-conditioned ones). Tasks with a zero gradient (squared norm below
    ``ZERO_ROW_TOL`` times the largest) would need an infinite weight: they are left out of the
    solve and given the largest weight of the others (their gradient is zero, so this choice does
    not change this step's update; it only matters when weights are reused). All-zero Gramian:
    ones. If Newton has not converged on the regularised equation after ``max_iter`` steps,
    SciPy's ``least_squares`` (as in the FairGrad authors' code) polishes the iterate.

    Example:
        >>> w = solve_power_bargaining(np.diag([4.0, 9.0]), 1.0)  # orthogonal, norms 2 and 3
        >>> np.round(w, 6).tolist()
        [0.5, 0.333333]
    """
    if power <= 0:
        raise ValueError(f"power must be > 0, found {power}")
    g = (
        gramian.detach().to("cpu", torch.float64).numpy()
        if isinstance(gramian, Tensor)
        else np.asarray(gramian, dtype=np.float64)
    )
    k = g.shape[0]
    g = 0.5 * (g + g.T)
    diag = np.clip(np.diag(g), 0.0, None)
    top = float(diag.max()) if k else 0.0
    if k == 0 or not math.isfinite(top) or top <= 0.0:
        return np.ones(k)
    live = diag > ZERO_ROW_TOL * top
    # solve for G / top (w scales by top^{-1/(1+power)} when G scales by 1/top)
    a = g[np.ix_(live, live)] / top
    with np.errstate(all="ignore"):  # overflow in hopeless iterates is caught, not printed
        w = _newton(a, power, max_iter=max_iter, tol=tol)
        if not _relative_residual(a, w, power) < tol:  # no solution for G: regularise
            w = _polished(a + reg * np.diag(diag[live]) / top, power, max_iter, tol)
    w = w * top ** (-1.0 / (1.0 + power))
    out = np.empty(k)
    out[live] = w
    out[~live] = w.max()
    return out


def _newton(a: np.ndarray, power: float, *, max_iter: int, tol: float) -> np.ndarray:
    d = np.diag(a)
    w = d ** (-1.0 / (1.0 + power))
    # best multiple c·w along the ray: c^{1+p} wᵀAw = Σ w_i^{1-p}
    quad = float(w @ a @ w)  # 0 for exactly opposed gradients (no solution: Newton fails)
    c = (float((w ** (1.0 - power)).sum()) / quad) ** (1.0 / (1.0 + power)) if quad > 0 else 1.0
    start = w = c * w
    for _ in range(max_iter):
        if _relative_residual(a, w, power) < tol:
            return w
        r = a @ w - w ** (-power)
        h = a + np.diag(power * w ** (-power - 1.0))
        q = 1.0 / np.sqrt(np.diag(h))
        try:
            step = q * np.linalg.solve(h * q[:, None] * q[None, :], -q * r)
        except np.linalg.LinAlgError:
            step = q * np.linalg.lstsq(h * q[:, None] * q[None, :], -q * r, rcond=None)[0]
        slope = float(r @ step)  # −(Newton decrement)²: how much f can still decrease, doubled
        if not slope < -1e-24:  # converged as far as float64 allows (or a NaN slipped in)
            break
        t = 1.0
        shrinking = step < 0
        if shrinking.any():  # stay inside w > 0
            t = min(1.0, 0.95 * float((-w[shrinking] / step[shrinking]).min()))
        while t > 1e-14 and _potential_change(a, w, step, t, power) > 1e-4 * t * slope:
            t *= 0.5  # Armijo backtracking on the convex potential
        w = w + t * step
    return w if np.isfinite(w).all() and (w > 0).all() else start


def _polished(a: np.ndarray, power: float, max_iter: int, tol: float) -> np.ndarray:
    """Newton, then SciPy's ``least_squares`` from its iterate when it has not converged."""
    best = _newton(a, power, max_iter=max_iter, tol=tol)
    if _relative_residual(a, best, power) < 1e-6:
        return best
    polished = _least_squares(a, best, power)
    if _relative_residual(a, polished, power) < _relative_residual(a, best, power):
        return polished
    return best


def _least_squares(a: np.ndarray, w0: np.ndarray, power: float) -> np.ndarray:
    """SciPy's bounded ``least_squares`` on the scale-free residual, from ``w0`` (as the FairGrad
    authors solve it); ``w0`` itself when SciPy fails."""
    from scipy.optimize import least_squares  # lazy: only when Newton did not converge

    def residual(z: np.ndarray) -> np.ndarray:
        w = z * w0
        with np.errstate(all="ignore"):
            out = (a @ w) * w**power - 1.0
        return np.nan_to_num(out, nan=1e300, posinf=1e300, neginf=-1e300)

    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore", RuntimeWarning)
            result = least_squares(residual, np.ones_like(w0), bounds=(1e-12, np.inf), xtol=1e-15)
    except (ValueError, np.linalg.LinAlgError):
        return w0
    w = np.asarray(result.x * w0)
    return w if np.isfinite(w).all() and (w > 0).all() else w0
