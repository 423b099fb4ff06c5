"""CAGrad: the update that maximises the worst task's improvement near the average gradient."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from polytask.balancing.base import BALANCERS
from polytask.balancing.engine import GramianWeightingAggregator, Level
from polytask.balancing.solvers.conflict_averse import (
    conflict_averse_ascent,
    conflict_averse_coefficients,
    conflict_averse_simplex,
    device_solve_dtype,
)
from polytask.errors import ConfigError
from polytask.tasks import TaskSpec

RESCALES = (0, 1, 2)
SOLVERS = ("auto", "numpy", "torch")
Solver = Literal["auto", "numpy", "torch"]


def cagrad_weights(
    gramian: Tensor, *, c: float, rescale: int = 1, solver: Solver = "auto"
) -> Tensor:
    """The CAGrad weights ``1/K + λ w`` (divided by the rescale factor) from the Gramian.

    ``solver``: ``"numpy"`` (float64 on the CPU), ``"torch"`` (``conflict_averse_coefficients``:
    on the Gramian's device, no host synchronisation) or ``"auto"``: NumPy for a Gramian on the
    CPU, torch on any other device. Both give the same weights to ~1e-14 in float64.

    ``w = argmin_{w ∈ Δ} <g_0, g_w> + √φ ||g_w||`` (``conflict_averse_simplex``), with
    ``φ = c² ||g_0||²``, ``g_0 = mean_i g_i``, ``||g_0||² = mean(G)``, and ``λ = √φ / ||g_w||``.
    ``λ w`` is then computed exactly on the optimal face (``conflict_averse_ascent``: a closed
    form in the cosine matrix, without dividing by ``||g_w||``, whose value computed from ``G``
    loses its digits when the gradient norms span orders of magnitude; an active-set loop
    corrects the face). Zero gradients get ``1/K`` only (their improvement is 0 whatever the
    update). Where 0 is in the convex hull of the non-zero gradients (exactly opposed ones) the
    maximiser is not unique and ``λ = 0`` is used (``d = g_0``).

    Example:
        >>> cagrad_weights(torch.eye(2), c=0.0, rescale=0)   # c = 0: the mean gradient
        tensor([0.5000, 0.5000])
    """
    k = gramian.shape[0]
    if solver not in SOLVERS:
        raise ConfigError(f"solver must be one of {SOLVERS}, found {solver!r}")
    if solver == "torch" or (solver == "auto" and gramian.device.type != "cpu"):
        dtype = device_solve_dtype(gramian.device)
        g_device = gramian.detach().to(dtype)
        center = torch.full((k,), 1.0 / k, dtype=dtype, device=g_device.device)
        radius_device = c * g_device.mean().clamp_min(0).sqrt()
        lam_w = conflict_averse_coefficients(g_device, center=center, radius=radius_device)
        return _rescaled(center + lam_w, c, rescale).to(gramian.dtype)
    g = gramian.detach().to("cpu", torch.float64)
    beta = torch.full((k,), 1.0 / k, dtype=torch.float64)
    radius = c * math.sqrt(max(float(g.mean()), 0.0))
    w = conflict_averse_simplex(g, center=beta, radius=radius)
    eps = torch.finfo(gramian.dtype).eps if gramian.is_floating_point() else 1e-7
    exact = conflict_averse_ascent(
        g.numpy(), beta.numpy(), radius, w.numpy(), dep_tol=10 * max(k, 1) * eps
    )
    # exact is None where 0 is in the hull of the gradients: the maximiser is not unique, d = g_0
    weights = beta if exact is None else beta + torch.from_numpy(exact)
    return _rescaled(weights, c, rescale).to(device=gramian.device, dtype=gramian.dtype)


def _rescaled(weights: Tensor, c: float, rescale: int) -> Tensor:
    """``weights`` divided by ``1 + c²`` (rescale 1), ``1 + c`` (2) or nothing (0)."""
    if rescale == 1:
        return weights / (1.0 + c * c)
    if rescale == 2:
        return weights / (1.0 + c)
    return weights


@BALANCERS.register(
    "cagrad",
    "conflict-averse gradient descent, worst-case improvement near the mean gradient "
    "(Liu, Liu, Jin, Stone & Liu, NeurIPS 2021)",
)
class CAGrad(GramianWeightingAggregator):
    """CAGrad (Liu, Liu, Jin, Stone & Liu, "Conflict-Averse Gradient Descent for Multi-task
    Learning", NeurIPS 2021).

    The update maximises the worst local improvement of any task within a ball around the
    average gradient ``g_0``:

        ``max_d min_i <g_i, d>``  subject to  ``||d - g_0|| <= c ||g_0||``,

    solved through its dual over the simplex, ``w = argmin_{w ∈ Δ} g_wᵀ g_0 + √φ ||g_w||``
    with ``g_w = Σ w_i g_i`` and ``φ = c² ||g_0||²``; then ``d = g_0 + (√φ / ||g_w||) g_w``.
    Everything is a function of the Gramian, so this is a Gramian weighting: the weights are
    ``1/K + (√φ / ||g_w||) w``. The dual is solved exactly, not by the paper's SLSQP: for a
    Gramian on the CPU by ``conflict_averse_simplex`` (a convex one-dimensional search over
    minimum-norm problems, float64 NumPy); on any other device by
    ``conflict_averse_coefficients`` (a fixed-budget barrier method and the closed form on its
    face, in torch on the device, float64 — float32 on MPS — with no host synchronisation).

    Numerical guarantee: with ``d' = (1 + c²) d`` (``rescale=1``; ``(1 + c) d`` for 2, ``d`` for
    0), ``‖d' − g_0‖ <= c‖g_0‖`` and ``min_i <g_i, d'>`` equals the exact optimum to
    ``100·K·eps·‖d'‖·max_{i active} ‖g_i‖`` (eps of the Jacobian's dtype), for gradient norms
    from 1e-4 to 1e4 in one matrix, zero, duplicated and near-opposite gradients, float32 and
    float64 (``tests/balancing/aggregation/test_numerical_guarantees.py`` compares it with the
    optimum found by enumerating the faces of the simplex). It cannot hold where 0 is in the
    convex hull of the non-zero gradients (exactly opposed gradients): then ``d = g_0``.

    Args:
        c: the radius of the ball, relative to ``||g_0||`` (``c = 0`` is the mean gradient).
        rescale: as in the authors' code, divide ``d`` by ``1 + c²`` (1), ``1 + c`` (2) or
            nothing (0).

    Example:
        >>> J = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # symmetric: w = (1/2, 1/2)
        >>> update, weights = CAGrad(["a", "b"], c=0.5, rescale=0).aggregate(J, torch.ones(2))
        >>> update   # g0 = (0.5, 0.5); d = g0 + 0.5 |g0| g0 / |g0| = 1.5 g0
        tensor([0.7500, 0.7500])
    """

    def __init__(
        self,
        tasks: Sequence[TaskSpec | str],
        *,
        c: float = 0.4,
        rescale: int = 1,
        level: Level = "parameters",
        update_every: int = 1,
    ) -> None:
        super().__init__(tasks, level=level, update_every=update_every)
        if not (c >= 0.0 and math.isfinite(c)):
            raise ConfigError(f"c must be a finite number >= 0, found {c}")
        if rescale not in RESCALES:
            raise ConfigError(f"rescale must be one of {RESCALES}, found {rescale!r}")
        self.c = float(c)
        self.rescale = int(rescale)

    def weights_from_gramian(
        self, gramian: Tensor, losses: Tensor, rows: Tensor | None = None
    ) -> Tensor:
        return cagrad_weights(gramian, c=self.c, rescale=self.rescale)

    def extra_repr(self) -> str:
        return f"c={self.c}, rescale={self.rescale}, level={self.level!r}"


__all__ = ["RESCALES", "CAGrad", "cagrad_weights"]
