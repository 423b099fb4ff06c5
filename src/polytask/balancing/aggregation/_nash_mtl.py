"""Nash-MTL: the task weights are the Nash bargaining solution of the tasks' gradients."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from polytask.balancing.base import BALANCERS
from polytask.balancing.engine import GramianWeightingAggregator, Level, clip_weights
from polytask.balancing.solvers.power_bargaining import solve_power_bargaining
from polytask.errors import ConfigError
from polytask.tasks import TaskSpec


@BALANCERS.register(
    "nash_mtl",
    "Nash bargaining weights, G·α = 1/α (Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik & "
    "Fetaya, ICML 2022)",
)
class NashMTL(GramianWeightingAggregator):
    """Nash-MTL (Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik & Fetaya, "Multi-Task
    Learning as a Bargaining Game", ICML 2022).

    The update ``d = Σ_i α_i g_i`` is the Nash bargaining solution of the tasks, whose utilities
    are ``g_iᵀ d``: the weights ``α > 0`` solve, element-wise,

        ``G α = 1 / α``   i.e.   ``α_i (G α)_i = 1`` for every task ``i``,

    with ``G = J Jᵀ`` the Gramian of the task gradients. The authors solve it by a sequence of
    convex programs in cvxpy; here it is solved exactly (to float64 precision) by damped Newton
    on the strictly convex ``½ αᵀGα − Σ log α_i``, whose stationarity condition is the equation
    above, on the K×K Gramian (moved to the CPU: one host synchronisation per recomputation).
    ``optim_niter`` bounds the Newton iterations (it converges in well under 20 on every Gramian
    we tried); SciPy's ``least_squares`` polishes the rare iterate that has not converged.

    Scaling, as in the authors' code: they solve on ``G / ‖G‖_F`` for conditioning, but their
    constraint ``−log(α_i ‖G‖_F) − log((G α / ‖G‖_F)_i) <= 0`` is the equation on the raw ``G``,
    and so is ``α`` here. At the solution ``‖αᵀJ‖² = αᵀGα = Σ_i α_i (Gα)_i = K``: the unclipped
    update has norm ``√K`` whatever the scale of the gradients (``α`` scales like ``1/‖g‖``).

    Numerical guarantee: ``α > 0`` and ``max_i |α_i (G α)_i − 1| <= 1e-10`` for the Gramian the
    method is given (float64 solve), whenever the equation has a solution — gradient norms from
    1e-4 to 1e4 in one matrix, duplicated and near-opposite gradients included. Measured against
    the exact Gramian of a float32 Jacobian it holds to ``1e-9 + 50·K·eps·α_i‖g_i‖ Σ_k
    α_k‖g_k‖`` (eps of the dtype: the float32 Gramian's rounding). It cannot hold where the
    equation has no solution: a zero gradient, or exactly opposed gradients (see below).
    ``tests/balancing/aggregation/test_numerical_guarantees.py`` holds it on the hard zoo,
    before clipping and after (the clipped weights are ``f·α``).

    ``max_norm > 0`` clips the norm of the shared-parameter update to ``max_norm``, as the
    authors' ``clip_grad_norm_(shared_parameters, max_norm)`` after the backward does: on steps
    that recompute the weights, the weights are scaled so ``‖αᵀJ‖ ≤ max_norm`` (the reported
    weights include that factor); on the steps in between (``update_every > 1``), the shared
    parameters' ``.grad`` is clipped after the plain backward (``level="parameters"`` only; at
    ``level="features"`` the clipping applies to the feature-level update on recompute steps).
    ``max_norm <= 0`` disables clipping.

    Gramians with no exact solution (a non-negative combination of the gradients vanishes:
    exactly opposed gradients) are solved for ``G + 1e-8·Diag(G)`` (a relative ridge, only
    then), which gives large but finite weights. A task whose
    gradient is zero would need an infinite weight: it gets the largest weight of the others
    (its gradient is zero, so this step's update does not depend on it).

    Args:
        tasks: the tasks, in the order of the losses.
        update_every: recompute the weights every N steps, reusing them in between (the authors
            use 25 in some experiments).
        max_norm: clip the update's norm to this value; ``<= 0`` disables clipping.
        optim_niter: maximum Newton iterations of the bargaining solver.
        level: ``parameters`` or ``features`` (see ``GradientAggregator``).

    Example:
        >>> agg = NashMTL(["a", "b"], max_norm=0.0)
        >>> jacobian = torch.tensor([[3.0, 0.0], [0.0, 4.0]])  # orthogonal, norms 3 and 4
        >>> update, weights = agg.aggregate(jacobian, torch.ones(2))
        >>> # α_i ‖g_i‖² α_i = 1: α = (1/3, 1/4), the update (1, 1) has norm √K = √2
        >>> [round(w, 4) for w in weights.tolist()], update.tolist()
        ([0.3333, 0.25], [1.0, 1.0])
    """

    def __init__(
        self,
        tasks: Sequence[TaskSpec | str],
        *,
        update_every: int = 1,
        max_norm: float = 1.0,
        optim_niter: int = 20,
        level: Level = "parameters",
    ) -> None:
        super().__init__(tasks, level=level, update_every=update_every)
        if optim_niter < 1:
            raise ConfigError(f"optim_niter must be >= 1, found {optim_niter}")
        self.max_norm = float(max_norm)
        self.optim_niter = int(optim_niter)

    def weights_from_gramian(
        self, gramian: Tensor, losses: Tensor, rows: Tensor | None = None
    ) -> Tensor:
        g = gramian.detach().to("cpu", torch.float64)
        alpha = torch.from_numpy(solve_power_bargaining(g, 1.0, max_iter=self.optim_niter))
        alpha = clip_weights(alpha, g, self.max_norm)
        return alpha.to(device=gramian.device, dtype=gramian.dtype)
