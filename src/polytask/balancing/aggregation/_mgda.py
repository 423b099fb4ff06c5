"""MGDA: the minimum-norm point of the convex hull of the task gradients (and MGDA-UB)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from polytask.balancing.base import BALANCERS
from polytask.balancing.engine import GramianWeightingAggregator, Level
from polytask.balancing.solvers.min_norm import min_norm_simplex
from polytask.errors import ConfigError
from polytask.tasks import TaskSpec

NORMALIZATIONS = ("none", "l2", "loss", "loss+")
_EPS = 1e-12


def gradient_normalizers(gramian: Tensor, losses: Tensor, normalization: str) -> Tensor:
    """The K divisors ``n_i`` of the task gradients (``g_i / n_i``) for MGDA's normalisations:
    ``none`` → 1, ``l2`` → ``||g_i||``, ``loss`` → ``L_i``, ``loss+`` → ``L_i ||g_i||``
    (clamped below at 1e-12 so zero gradients or losses never divide by zero).

    Example:
        >>> G = torch.tensor([[4.0, 0.0], [0.0, 9.0]])
        >>> gradient_normalizers(G, torch.tensor([0.5, 2.0]), "loss+")
        tensor([1., 6.])
    """
    norms = gramian.diagonal().clamp_min(0).sqrt()
    if normalization == "none":
        n = torch.ones_like(norms)
    elif normalization == "l2":
        n = norms
    elif normalization == "loss":
        n = losses.to(norms.dtype)
    elif normalization == "loss+":
        n = losses.to(norms.dtype) * norms
    else:
        raise ConfigError(f"normalization must be one of {NORMALIZATIONS}, found {normalization!r}")
    return n.clamp_min(_EPS)


@BALANCERS.register(
    "mgda",
    "min-norm point of the convex hull of the task gradients (Sener & Koltun, NeurIPS 2018)",
)
class MGDA(GramianWeightingAggregator):
    """MGDA (Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS
    2018): the update is the minimum-norm element of the convex hull of the task gradients,

        ``w = argmin_{w ∈ Δ} ||Σ_i w_i g̃_i||²  =  argmin_{w ∈ Δ} wᵀ G̃ w``,  ``d = Σ_i w_i g̃_i``,

    the common descent direction of the multiple-gradient descent algorithm (Désidéri 2012): it
    has ``<g_i, d> >= ||d||²`` for every task, with equality for the tasks of positive weight
    (``d = 0`` at a Pareto-stationary point). ``G̃`` is solved exactly by ``min_norm_simplex``
    (closed form for K = 2, an active-set solver for K > 2; moves the K×K Gramian to the CPU).

    ``normalization`` rescales each gradient before solving, ``g̃_i = g_i / n_i``, with the
    paper's / LibMTL's choices: ``none`` (``n_i = 1``), ``l2`` (``n_i = ||g_i||``: unit
    gradients), ``loss`` (``n_i = L_i``, the current loss) and ``loss+`` (``n_i = L_i ||g_i||``;
    the default of the authors' code). Losses should be positive; divisors are clamped at 1e-12.
    The reported weights are those of the raw gradients, ``w_i / n_i``, so
    ``update = weights @ J``.

    MGDA-UB (the paper's upper-bound approximation) is this class with ``level="features"``:
    the Jacobian is taken with respect to the shared representation and the resulting weights
    are back-propagated through the encoder; ``mgda_ub`` is registered with that default.

    Numerical guarantee (``normalization="none"``): ``w`` is on the simplex and ``<g_i, d> >=
    ||d||²`` for every task (the KKT conditions of the min-norm point), to
    ``20·K·eps·||g_i||·Σ_k w_k ||g_k||`` (eps of the Jacobian's dtype), on gradient norms from
    1e-4 to 1e4 in one matrix, zero, duplicated and near-opposite gradients, K from 2 to 10, P
    up to 1000, float32 and float64
    (``tests/balancing/aggregation/test_numerical_guarantees.py``). (Before, K = 2 computed the
    small weight as ``1 − w1``: with norms 1e-4 and 1e4 it lost every digit, up to 1.7e6 times
    that tolerance; now it has its own formula.)

    Example:
        >>> J = torch.tensor([[1.0, 0.0], [0.0, 2.0]])   # G = diag(1, 4): w1 = 4 / 5
        >>> update, weights = MGDA(["a", "b"]).aggregate(J, torch.ones(2))
        >>> weights, update
        (tensor([0.8000, 0.2000]), tensor([0.8000, 0.4000]))
    """

    def __init__(
        self,
        tasks: Sequence[TaskSpec | str],
        *,
        normalization: str = "none",
        level: Level = "parameters",
        update_every: int = 1,
    ) -> None:
        super().__init__(tasks, level=level, update_every=update_every)
        if normalization not in NORMALIZATIONS:
            raise ConfigError(
                f"normalization must be one of {NORMALIZATIONS}, found {normalization!r}"
            )
        self.normalization = normalization

    def weights_from_gramian(
        self, gramian: Tensor, losses: Tensor, rows: Tensor | None = None
    ) -> Tensor:
        n = gradient_normalizers(gramian, losses, self.normalization)
        scaled = gramian / (n[:, None] * n[None, :])
        w = min_norm_simplex(scaled).to(gramian.dtype)
        return w / n

    def extra_repr(self) -> str:
        return f"normalization={self.normalization!r}, level={self.level!r}"


@BALANCERS.register(
    "mgda_ub",
    "MGDA on the gradients w.r.t. the shared features, MGDA-UB (Sener & Koltun, NeurIPS 2018)",
)
class MGDAUB(MGDA):
    """MGDA-UB (Sener & Koltun, NeurIPS 2018, Section 3.3): ``MGDA`` with ``level="features"``
    by default — the min-norm problem is solved on the gradients of the losses with respect to
    the shared representation ``Z`` (an upper bound of the parameter-level objective), one
    backward through the heads instead of a per-task backward through the encoder.

    Numerical guarantee: ``MGDA``'s, for the feature-level Jacobian it is given.

    Example:
        >>> MGDAUB(["a", "b"]).level
        'features'
    """

    def __init__(
        self,
        tasks: Sequence[TaskSpec | str],
        *,
        normalization: str = "none",
        level: Level = "features",
        update_every: int = 1,
    ) -> None:
        super().__init__(tasks, normalization=normalization, level=level, update_every=update_every)


__all__ = ["MGDA", "MGDAUB", "NORMALIZATIONS", "gradient_normalizers"]
