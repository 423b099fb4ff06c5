"""GradNorm (Chen, Badrinarayanan, Lee & Rabinovich, ICML 2018)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar

import torch
from torch import Tensor, nn

from polytask.balancing.base import (
    BALANCERS,
    Balancer,
    BalanceResult,
    present_mask,
    stack_losses,
)
from polytask.balancing.jacobian import task_jacobian
from polytask.balancing.weighting._masking import EPS, zero_absent
from polytask.errors import ConfigError
from polytask.tasks import TaskSpec


@BALANCERS.register(
    "gradnorm",
    "learned weights equalising gradient norms and training rates (Chen et al., ICML 2018)",
)
class GradNorm(Balancer):
    """GradNorm (Chen, Badrinarayanan, Lee & Rabinovich, "GradNorm: Gradient Normalization for
    Adaptive Loss Balancing in Deep Multitask Networks", ICML 2018).

    Learnable weights ``w_k`` (a parameter, initially 1). At each call, with ``W`` the last shared
    layer, ``G_k = ||∇_W w_k L_k|| = w_k ||∇_W L_k||``, the inverse training rates
    ``r_k = (L_k / L_k(0)) / mean_i (L_i / L_i(0))`` and the target
    ``G_k* = mean_i(G_i) · r_k^α`` (held constant), the GradNorm loss is
    ``Σ_k |G_k - G_k*|``. The model's gradients are those of ``Σ_k w_k L_k``; the gradient of the
    GradNorm loss with respect to ``w`` (only) is added to ``weights.grad``, so give
    ``balancer.parameters()`` to the optimizer, which steps the weights with the model. The
    weights are renormalised to sum to K (after clamping them at ``1e-8``, which keeps them
    positive) at the start of the next call, which is what the paper does after each step; the
    reported weights are the renormalised ones used in the step.

    ``W`` is the last tensor of ``shared_params`` with at least two dimensions (the weight of the
    last shared layer; its bias is left out), or the last tensor when none has two. The per-task
    gradients of ``W`` come from one batched backward (exact: ``G_k`` is linear in ``w_k``, so no
    second-order backward is needed). ``L_k(0)`` is task k's loss the first time it is present
    (buffer ``initial_losses``). Absent tasks get weight 0 in the step and no GradNorm gradient;
    the averages run over the present tasks.

    Args:
        tasks: the tasks, in the order of the losses.
        alpha: the asymmetry ``α`` (0: equal gradient norms; larger: stronger pull of the slow
            tasks).

    Example:
        >>> w = torch.nn.Parameter(torch.tensor([[2.0, 5.0]]))
        >>> g = GradNorm(["a", "b"], alpha=1.5)
        >>> result = g.backward(torch.stack([3 * w[0, 0], w[0, 1]]), shared_params=[w])
        >>> result.weights.tolist(), g.weights.grad.tolist()  # G = (3, 1) vs target (2, 2)
        ([1.0, 1.0], [3.0, -1.0])
    """

    needs_shared_params: ClassVar[bool] = True
    requires_positive_losses: ClassVar[bool] = True
    initial_losses: Tensor
    has_initial: Tensor

    def __init__(self, tasks: Sequence[TaskSpec | str], *, alpha: float = 1.5) -> None:
        super().__init__(tasks)
        if not alpha >= 0:
            raise ConfigError(f"gradnorm: alpha must be >= 0, found {alpha!r}")
        self.alpha = float(alpha)
        k = self.num_tasks
        self.weights = nn.Parameter(torch.ones(k))
        self.register_buffer("initial_losses", torch.zeros(k))
        self.register_buffer("has_initial", torch.zeros(k, dtype=torch.bool))

    @staticmethod
    def shared_layer(shared_params: Sequence[Tensor]) -> Tensor:
        """The tensor GradNorm measures gradient norms on: the last one with >= 2 dimensions."""
        matrices = [p for p in shared_params if p.dim() >= 2]
        return matrices[-1] if matrices else shared_params[-1]

    @torch.no_grad()
    def renormalise(self) -> None:
        """Clamp the weights at 1e-8 and rescale them to sum to K (done at each call)."""
        clamped = self.weights.clamp_min(EPS)
        self.weights.copy_(clamped * (self.num_tasks / clamped.sum()))

    def backward(
        self,
        losses: Mapping[str, Tensor] | Sequence[Tensor] | Tensor,
        *,
        shared_params: Sequence[Tensor] | None = None,
        features: Tensor | None = None,
        present: Tensor | None = None,
        grad_scale: Tensor | float = 1.0,
    ) -> BalanceResult:
        self.check_grad_scale(grad_scale)
        vector = stack_losses(self.task_names, losses)
        if not shared_params:
            raise ValueError("GradNorm needs shared_params= (the shared parameters)")
        present = present_mask(vector, present)
        self.renormalise()
        layer = self.shared_layer(list(shared_params))
        (block,) = task_jacobian(vector, [layer], retain_graph=True)
        if self.reducer is not None and block is not None:  # the global per-task gradients
            block = self.reducer.mean(block)
        weights = self.weights
        if block is None:
            norms = torch.zeros_like(weights)
        else:
            norms = block.reshape(self.num_tasks, -1).norm(dim=1).to(weights.dtype)
        norms = zero_absent(norms, present)
        detached = vector.detach().to(weights.dtype)
        if self.reducer is not None:  # the global loss values (the surrogates' mean)
            detached = self.reducer.mean(detached)
        with torch.no_grad():
            first = present & ~self.has_initial
            self.initial_losses.copy_(torch.where(first, detached, self.initial_losses))
            self.has_initial |= present
        count = present.sum().clamp_min(1).to(weights.dtype)
        rates = zero_absent(detached / self.initial_losses.clamp_min(EPS), present)
        inverse_rates = rates / (rates.sum() / count).clamp_min(EPS)
        grad_norms = weights * norms
        target = (zero_absent(grad_norms, present).sum() / count) * inverse_rates.pow(self.alpha)
        gradnorm_loss = zero_absent((grad_norms - target.detach()).abs(), present).sum()
        (weights_grad,) = torch.autograd.grad(gradnorm_loss, weights)
        if weights.grad is None:
            weights.grad = weights_grad.detach()
        else:
            weights.grad.add_(weights_grad)
        used = zero_absent(weights.detach(), present).to(vector.dtype)
        total = zero_absent(used * vector, present).sum()
        total.backward()
        return BalanceResult(
            weights=used,
            loss=total.detach(),
            extras={
                "gradnorm_loss": gradnorm_loss.detach(),
                "grad_norms": grad_norms.detach(),
                "target_norms": target.detach(),
            },
        )
