"""Aligned-MTL: align the task gradients so their matrix has condition number one."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from polytask.balancing.base import BALANCERS
from polytask.balancing.engine import GramianWeightingAggregator, Level
from polytask.errors import ConfigError
from polytask.tasks import TaskSpec

ScaleMode = Literal["min", "median", "rmse"]
SCALE_MODES: tuple[str, ...] = ("min", "median", "rmse")


def aligned_mtl_matrix(gramian: Tensor, scale_mode: ScaleMode = "min") -> Tensor:
    """The K×K alignment matrix ``B = σ · V Λ^{-1/2} Vᵀ`` of the Gramian ``G = V Λ Vᵀ``.

    Eigenvalues at or below ``max(λ) · K · eps`` (the machine epsilon of the Gramian's dtype, as
    in the authors' code) are dropped: ``V`` and ``Λ`` keep the R positive ones. ``σ²`` is the
    smallest kept eigenvalue (``min``), their median (``median``, the lower one for an even
    count, as ``torch.median``) or their mean (``rmse``). The aligned gradients ``Bᵀ J`` (rows
    ``Σ_j B_ji g_j``) have Gramian ``B G B = σ² V Vᵀ``: every non-zero singular value equals σ.
    All-zero Gramian: zeros. Computed in float64, on the Gramian's device, without host sync.

    Example:
        >>> aligned_mtl_matrix(torch.diag(torch.tensor([1.0, 4.0])))  # gradients of norms 1, 2
        tensor([[1.0000, 0.0000],
                [0.0000, 0.5000]])
    """
    if scale_mode not in SCALE_MODES:
        raise ValueError(f"scale_mode must be one of {SCALE_MODES}, found {scale_mode!r}")
    k = gramian.shape[0]
    eps = torch.finfo(gramian.dtype).eps
    g = gramian.to(torch.float64)
    g = 0.5 * (g + g.T)
    values, vectors = torch.linalg.eigh(g)
    tol = values.max().clamp_min(0.0) * k * eps
    keep = values > tol
    safe = torch.where(keep, values, torch.ones_like(values))
    inv_sqrt = torch.where(keep, safe.rsqrt(), torch.zeros_like(values))
    if scale_mode == "min":
        sigma2 = torch.where(keep, values, torch.full_like(values, torch.inf)).min()
    elif scale_mode == "median":
        # lower median of the kept eigenvalues: sort them first, the dropped ones (as +inf) last
        ordered = torch.sort(torch.where(keep, values, torch.full_like(values, torch.inf))).values
        count = keep.sum()
        index = ((count - 1).clamp_min(0) // 2).reshape(1)
        sigma2 = ordered.gather(0, index).squeeze(0)
    else:
        sigma2 = torch.where(keep, values, torch.zeros_like(values)).sum() / keep.sum().clamp_min(1)
    sigma2 = torch.where(keep.any(), sigma2, torch.zeros_like(sigma2))
    matrix = (vectors * inv_sqrt) @ vectors.T * sigma2.sqrt()
    return matrix.to(gramian.dtype)


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
