"""``min ½ xᵀQx + cᵀx`` over ``x >= 0``: the non-negative quadratic program every Gramian solver
reduces to (exact primal active-set method, float64 NumPy)."""

from __future__ import annotations

import numpy as np

_TINY = 1e-300


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
