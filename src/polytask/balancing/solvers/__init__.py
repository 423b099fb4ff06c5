"""The small exact problems the gradient methods solve, one module per problem (no method is
registered here).

Every solver works on the K×K Gramian ``G = J Jᵀ`` of the task gradients (K is small, at most a
few tens), in float64 NumPy on the CPU: calling one moves the Gramian to the host (a device sync,
inherent to solving a small problem exactly). The torch-facing functions take and return torch
tensors (on the Gramian's device, in its floating dtype).

* ``nonnegative_qp(Q, c)``: ``min ½ xᵀQx + cᵀx`` over ``x >= 0`` (NumPy, the building block);
* ``min_norm_simplex(G)``: the weights ``w`` on the simplex minimising ``wᵀGw`` (MGDA);
* ``project_onto_dual_cone(G, u)``: ``argmin_{v >= u} vᵀGv`` (UPGrad, DualProj);
* ``conflict_averse_simplex(G, center=β, radius=s)``: ``argmin_{w ∈ Δ} wᵀGβ + s·√(wᵀGw)``
  (CAGrad); its companion ``conflict_averse.conflict_averse_coefficients`` solves CAGrad's dual
  in torch on the Gramian's device instead, without a host synchronisation (used on GPUs);
* ``solve_power_bargaining(G, power)``: the positive ``w`` with ``G w = w^{-power}`` (Nash-MTL,
  FairGrad);
* ``normalize_gramian(G)``: ``G`` divided by its mean diagonal (scale-free solves).

Example:
    >>> import torch
    >>> G = torch.tensor([[1.0, 0.0], [0.0, 4.0]])   # two orthogonal gradients, norms 1 and 2
    >>> min_norm_simplex(G)                           # w1 = 4 / (1 + 4)
    tensor([0.8000, 0.2000])
    >>> project_onto_dual_cone(torch.tensor([[1.0, -1.0], [-1.0, 4.0]]), torch.tensor([1.0, 0.0]))
    tensor([1.0000, 0.2500])
"""

from polytask.balancing.solvers._gramian import normalize_gramian
from polytask.balancing.solvers.conflict_averse import conflict_averse_simplex
from polytask.balancing.solvers.dual_cone import project_onto_dual_cone
from polytask.balancing.solvers.min_norm import min_norm_simplex
from polytask.balancing.solvers.nonnegative_qp import nonnegative_qp
from polytask.balancing.solvers.power_bargaining import solve_power_bargaining

__all__ = [
    "conflict_averse_simplex",
    "min_norm_simplex",
    "nonnegative_qp",
    "normalize_gramian",
    "project_onto_dual_cone",
    "solve_power_bargaining",
]
