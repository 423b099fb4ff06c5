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

    Scaling, as in the authors' code: ``α`` is the solution for the normalised ``G / ‖G‖_F``.
    When ``G`` is scaled by ``s`` the solution of the raw equation scales by ``1/√s``, so the
    reported ``α`` is ``√‖G‖_F`` times the solution of ``G α = 1/α``, and the update's norm
    (``√(K ‖G‖_F)`` before clipping) scales like the gradients, as an ordinary gradient does.

    ``max_norm > 0`` clips the norm of the shared-parameter update to ``max_norm``, as the
    authors' ``clip_grad_norm_(shared_parameters, max_norm)`` after the backward does: on steps
    that recompute the weights, the weights are scaled so ``‖αᵀJ‖ ≤ max_norm`` (the reported
    weights include that factor); on the steps in between (``update_every > 1``), the shared
    parameters' ``.grad`` is clipped after the plain backward (``level="parameters"`` only; at
    ``level="features"`` the clipping applies to the feature-level update on recompute steps).
    ``max_norm <= 0`` disables clipping.

    Singular Gramians have no exact solution when a non-negative combination of the gradients
    vanishes (exactly opposed gradients); the equation is then solved for
    ``G + 1e-8·Diag(G)`` (a relative ridge), which gives large but finite weights. A task whose
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
        >>> # raw solution (1/3, 1/4), times √‖G‖_F = (9² + 16²)^{1/4} = 337^{1/4} ≈ 4.2846
        >>> [round(w, 4) for w in weights.tolist()]
        [1.4282, 1.0711]
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
        raw = torch.from_numpy(solve_power_bargaining(g, 1.0, max_iter=self.optim_niter))
        alpha = raw * torch.linalg.matrix_norm(g).sqrt()  # the solution for G / ‖G‖_F
        alpha = clip_weights(alpha, g, self.max_norm)
        return alpha.to(device=gramian.device, dtype=gramian.dtype)
