"""Aligned-MTL: align the task gradients so their matrix has condition number one."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from polytask.balancing.base import BALANCERS
from polytask.balancing.engine import GramianWeightingAggregator, Level
from polytask.balancing.solvers._gramian import to_numpy, to_torch
from polytask.errors import ConfigError
from polytask.tasks import TaskSpec

ScaleMode = Literal["min", "median", "rmse"]
SCALE_MODES: tuple[str, ...] = ("min", "median", "rmse")


def _factor(g: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """``(U, S)`` with ``G = U S² Uᵀ`` over the numerical rank, every singular value to high
    relative accuracy: ``G = N C N`` (``N`` the gradient norms, ``C`` the cosine matrix, well
    scaled), ``C ≈ M Mᵀ`` from its eigenpairs above ``K · eps · max`` (the rank is decided on
    ``C``, so a small gradient is not mistaken for rounding noise), and the row-scaled factor
    ``F = N M`` goes through LAPACK's preconditioned Jacobi SVD (``dgejsv``, row pivoting), which
    is accurate for row-scaled matrices where an eigen-decomposition of ``G`` is not."""
    from scipy.linalg import lapack  # lazy: SciPy is only needed here and in the solvers

    n = np.sqrt(np.clip(np.diag(g), 0.0, None))
    cos = g / np.outer(n, n)
    theta, q = np.linalg.eigh(0.5 * (cos + cos.T))
    keep = theta > g.shape[0] * eps * theta.max()
    factor = n[:, None] * (q[:, keep] * np.sqrt(theta[keep]))  # G ≈ F Fᵀ, K×R
    k, r = factor.shape
    # U is the right singular basis of the column-scaled Fᵀ (padded square): the vectors that
    # dgejsv computes accurately for column-scaled matrices
    padded = np.zeros((k, k))
    padded[:r] = factor.T
    sva, _, v, work, _, info = lapack.dgejsv(np.asfortranarray(padded), joba=1, jobu=3)
    if info != 0:  # LAPACK refused: fall back to the plain SVD
        u, s, _ = np.linalg.svd(factor, full_matrices=False)
        return u, s
    return v[:, :r], (sva * work[0] / work[1])[:r]


def aligned_mtl_matrix(gramian: Tensor, scale_mode: ScaleMode = "min") -> Tensor:
    """The K×K alignment matrix ``B = σ · U S⁻¹ Uᵀ`` of the Gramian ``G = U S² Uᵀ``.

    ``U`` and ``S`` keep the numerical rank R of the gradients, decided scale-free on their
    cosine matrix (eigenvalues above ``K · eps · max``, eps of the Gramian's dtype), and are
    computed to high relative accuracy even when the gradient norms span 1e-4 … 1e4 (``_factor``:
    an eigen-decomposition of such a ``G``, whose eigenvalues span 16 orders of magnitude, loses
    the small ones). ``σ²`` is the smallest kept eigenvalue ``S²`` (``min``), their median
    (``median``, the lower one for an even count, as ``torch.median``) or their mean (``rmse``).
    The aligned gradients ``Bᵀ J`` (rows ``Σ_j B_ji g_j``) have Gramian ``B G B = σ² U Uᵀ``:
    every non-zero singular value equals σ. Zero gradients get zero rows and columns; an
    all-zero Gramian gives zeros. Computed in float64 NumPy on the CPU (moves the K×K Gramian
    to the host).

    Example:
        >>> aligned_mtl_matrix(torch.diag(torch.tensor([1.0, 4.0])))  # gradients of norms 1, 2
        tensor([[1.0000, 0.0000],
                [0.0000, 0.5000]])
    """
    if scale_mode not in SCALE_MODES:
        raise ValueError(f"scale_mode must be one of {SCALE_MODES}, found {scale_mode!r}")
    k = gramian.shape[0]
    g = to_numpy(gramian)
    live = np.diag(g) > 0.0
    matrix = np.zeros((k, k))
    if live.any():
        u, s = _factor(g[np.ix_(live, live)], float(torch.finfo(gramian.dtype).eps))
        values = np.sort(s * s)
        if scale_mode == "min":
            sigma2 = values[0]
        elif scale_mode == "median":
            sigma2 = values[(values.size - 1) // 2]
        else:
            sigma2 = values.mean()
        matrix[np.ix_(live, live)] = (u / s) @ u.T * np.sqrt(sigma2)
    return to_torch(matrix, gramian)


@BALANCERS.register(
    "aligned_mtl",
    "align the task gradients to equal singular values (Senushkin, Patakin, Kuznetsov & "
    "Konushin, CVPR 2023)",
)
class AlignedMTL(GramianWeightingAggregator):
    """Aligned-MTL (Senushkin, Patakin, Kuznetsov & Konushin, "Independent Component Alignment
    for Multi-Task Learning", CVPR 2023).

    The gradient matrix ``J`` (K×P) is replaced by the aligned matrix ``Ĵ = Bᵀ J`` whose
    non-zero singular values are all equal (condition number one), the closest such matrix to
    ``J`` up to scale (an orthogonal Procrustes problem). With ``G = J Jᵀ = V Λ Vᵀ`` (eigenvalues
    at numerical zero dropped, see ``aligned_mtl_matrix``):

        ``B = σ · V Λ^{-1/2} Vᵀ``,   ``Ĵ Ĵᵀ = B G B = σ² V Vᵀ``,

    with ``σ² = λ_min`` (``scale_mode="min"``, the paper's choice), the median or the mean of the
    kept eigenvalues. Following Algorithm 1 and the authors' code, the update is the sum of the
    aligned task gradients, ``Σ_i ĝ_i = (B 1)ᵀ J``, so the weights are ``w = B 1`` (the row sums
    of ``B``). (torchjd's port averages them instead: its update is this one divided by K.)
    When every task's gradient is the same ``g``, ``B = 11ᵀ/K`` and the update is ``K g``, the
    plain sum.

    Numerical guarantee (``scale_mode="min"``): the update is ``σ 1ᵀ U Vᵀ`` for the SVD ``J = U
    S Vᵀ`` over the numerical rank (the sum of aligned gradients whose singular values all equal
    ``σ = min S``), to ``100·K·√P·eps·κ·σ√R`` (κ: condition number of the gradients' cosine
    matrix, R the rank, √P the rounding of ``J Jᵀ``), on gradient norms from 1e-4 to 1e4 in one
    matrix, zero, duplicated and near-opposite gradients, K from 2 to 10, P up to 1000, float32
    and float64 (``tests/balancing/aggregation/test_numerical_guarantees.py``). Before, the
    eigen-decomposition of ``G`` (eigenvalues spanning 16 orders of magnitude) lost the small
    eigenpairs: the rank cut dropped them or their vectors were wrong.

    Args:
        tasks: the tasks, in the order of the losses.
        scale_mode: ``min``, ``median`` or ``rmse``: the common singular value σ.
        update_every: recompute the weights every N steps, reusing them in between.
        level: ``parameters`` or ``features`` (see ``GradientAggregator``).

    Example:
        >>> agg = AlignedMTL(["a", "b"])
        >>> jacobian = torch.tensor([[1.0, 0.0], [0.0, 2.0]])  # orthogonal, norms 1 and 2
        >>> update, weights = agg.aggregate(jacobian, torch.ones(2))
        >>> weights.tolist(), update.tolist()  # both aligned gradients have norm σ = 1
        ([1.0, 0.5], [1.0, 1.0])
    """

    def __init__(
        self,
        tasks: Sequence[TaskSpec | str],
        *,
        scale_mode: ScaleMode = "min",
        update_every: int = 1,
        level: Level = "parameters",
    ) -> None:
        super().__init__(tasks, level=level, update_every=update_every)
        if scale_mode not in SCALE_MODES:
            raise ConfigError(f"scale_mode must be one of {SCALE_MODES}, found {scale_mode!r}")
        self.scale_mode: ScaleMode = scale_mode

    def weights_from_gramian(
        self, gramian: Tensor, losses: Tensor, rows: Tensor | None = None
    ) -> Tensor:
        return aligned_mtl_matrix(gramian.detach(), self.scale_mode).sum(dim=1)
