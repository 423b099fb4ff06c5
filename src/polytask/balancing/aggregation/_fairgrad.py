"""FairGrad: α-fair allocation of the update among the tasks."""

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
    "fairgrad",
    "α-fair task weights, G·w = w^(-1/α) (Ban & Ji, ICML 2024)",
)
class FairGrad(GramianWeightingAggregator):
    """FairGrad (Ban & Ji, "Fair Resource Allocation in Multi-Task Learning", ICML 2024).

    The update ``d = Σ_i w_i g_i`` maximises the α-fair utility ``Σ_i u_i^{1-α} / (1-α)`` of the
    tasks' rates of improvement ``u_i = g_iᵀ d`` (``Σ log u_i`` at ``α = 1``) in a ball; its
    optimality condition gives the weights ``w > 0`` solving, element-wise,

        ``G w = w^{-1/α}``   i.e.   ``(G w)_i = w_i^{-1/α}`` for every task ``i``,

    with ``G = J Jᵀ`` the Gramian. ``α = 1`` is proportional fairness (the Nash-MTL equation
    ``G w = 1/w``, without Nash-MTL's normalisation of ``G``); ``α → ∞`` tends to max-min
    fairness and ``α → 0`` to the plain sum. The authors solve it with SciPy's
    ``least_squares(bounds=(0, inf))`` from ``w = 1/K``; here damped Newton on the strictly convex
    ``½ wᵀGw − Σ h(w_i)`` with ``h'(w) = w^{-1/α}`` finds it to float64 precision, and
    ``least_squares`` is only the fallback (the K×K Gramian is moved to the CPU: one host
    synchronisation per recomputation). The Gramian is used as is, as in the authors' code: when
    ``G`` is scaled by ``s``, ``w`` scales by ``s^{-α/(α+1)}``.

    ``max_norm > 0`` clips the update's norm, as the authors' ``clip_grad_norm_`` does (see
    ``NashMTL``: the weights are scaled on recompute steps, the shared ``.grad`` is clipped on
    reuse steps). The authors' code also multiplies the update by K before clipping ("to match
    the sum loss"); the weights here are the solution itself, unscaled.

    Robustness: exactly opposed gradients have no finite solution; the equation is solved for
    ``G + 1e-8·Diag(G)``. A task with a zero gradient gets the largest weight of the others. For
    ``α`` far from 1 (say below 0.5 or above 2) combined with gradient norms differing by orders
    of magnitude, the equation is extremely ill-conditioned and the solver returns its best
    finite positive iterate.

    Numerical guarantee: ``w > 0`` and ``max_i |w_i^(1/α) (G w)_i − 1| <= 1e-10`` for the
    Gramian given (float64 solve) whenever the equation has a solution; at ``α = 1`` it is held
    on gradient norms from 1e-4 to 1e4 in one matrix, zero, duplicated and near-opposite
    gradients, K from 2 to 10, P up to 1000, float32 and float64, before and after clipping, to
    ``1e-9 + 50·K·eps·w_i‖g_i‖ Σ_k w_k‖g_k‖`` against the exact Gramian
    (``tests/balancing/aggregation/test_numerical_guarantees.py``). It cannot hold for a zero
    gradient or exactly opposed gradients (below). The ridge used to be added always, leaving
    residuals of 1e-8 relative (up to 3e-5 with near-opposite gradients); it is now added only
    when Newton cannot solve the equation on ``G``.

    Args:
        tasks: the tasks, in the order of the losses.
        alpha: the fairness parameter (> 0); 1 is proportional fairness.
        max_norm: clip the update's norm to this value; ``<= 0`` disables clipping.
        update_every: recompute the weights every N steps, reusing them in between.
        level: ``parameters`` or ``features`` (see ``GradientAggregator``).

    Example:
        >>> agg = FairGrad(["a", "b"], alpha=2.0, max_norm=0.0)
        >>> jacobian = torch.tensor([[2.0, 0.0], [0.0, 1.0]])  # orthogonal, norms 2 and 1
        >>> update, weights = agg.aggregate(jacobian, torch.ones(2))
        >>> # 4 w1 = w1^(-1/2)  =>  w1 = 4^(-2/3) ≈ 0.3969;  1 w2 = w2^(-1/2)  =>  w2 = 1
        >>> [round(w, 4) for w in weights.tolist()]
        [0.3969, 1.0]
    """

    def __init__(
        self,
        tasks: Sequence[TaskSpec | str],
        *,
        alpha: float = 1.0,
        max_norm: float = 1.0,
        update_every: int = 1,
        level: Level = "parameters",
    ) -> None:
        super().__init__(tasks, level=level, update_every=update_every)
        if not alpha > 0:
            raise ConfigError(f"alpha must be > 0, found {alpha}")
        self.alpha = float(alpha)
        self.max_norm = float(max_norm)

    def weights_from_gramian(
        self, gramian: Tensor, losses: Tensor, rows: Tensor | None = None
    ) -> Tensor:
        g = gramian.detach().to("cpu", torch.float64)
        w = torch.from_numpy(solve_power_bargaining(g, 1.0 / self.alpha))
        w = clip_weights(w, g, self.max_norm)
        return w.to(device=gramian.device, dtype=gramian.dtype)
