"""FAMO: Fast Adaptive Multitask Optimization (Liu, Liu, Stone & Liu, NeurIPS 2023)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar

import torch
from torch import Tensor

from polytask.balancing.base import BALANCERS, LossWeighting, stack_losses
from polytask.balancing.weighting._masking import EPS, masked_softmax, tiny, zero_absent
from polytask.errors import ConfigError
from polytask.tasks import TaskSpec


@BALANCERS.register(
    "famo", "fast adaptive multitask optimization, balanced log-loss decrease (Liu et al., 2023)"
)
class FAMO(LossWeighting):
    """FAMO (Liu, Liu, Stone & Liu, "FAMO: Fast Adaptive Multitask Optimization", NeurIPS 2023,
    Algorithm 1).

    Logits ``ξ`` (buffer, initially 0) give ``z = softmax(ξ)`` over the present tasks. The step
    follows ``d = c Σ_k z_k ∇ log L_k`` with ``c = (Σ_k z_k / L_k)^{-1}``: the combined loss is
    ``c · Σ_k z_k log(L_k + ε)`` (``c`` held constant, ``ε = 1e-8``; its value can be negative),
    i.e. the gradient of ``Σ_k w_k L_k`` with the reported weights
    ``w_k = c z_k / (L_k + ε)`` (they sum to 1). Losses are assumed non-negative with minimum 0.

    The logits then move towards the tasks whose log-loss decreased least:
    ``δ = ∇_ξ Σ_k z_k (log L_k(before) - log L_k(after))`` (through the softmax Jacobian:
    ``δ_k = z_k (Δ_k - Σ_i z_i Δ_i)``) and ``ξ ← ξ - β (δ + γ ξ)``, over the tasks present at both
    times. The paper measures ``L(after)`` on the same batch after the optimizer step, at the
    cost of a forward pass; by default (and in the Trainer) this balancer uses the cheaper
    variant of LibMTL and the FAMO code: at each call it first updates ``ξ`` from the previous
    call's losses (buffer ``previous_losses``) and the current ones, then weights. A loop that
    wants the paper's exact algorithm calls ``update(losses_after)`` with the same batch's losses
    after each optimizer step (the next call then skips its own update).

    Args:
        tasks: the tasks, in the order of the losses.
        beta: the logits' learning rate ``β``.
        gamma: the logits' weight decay ``γ``.

    Example:
        >>> famo = FAMO(["a", "b"])
        >>> total, w = famo.combine(torch.tensor([1.0, 4.0]), torch.tensor([True, True]))
        >>> [round(v, 6) for v in w.tolist()]   # z = (.5, .5); c = 1 / (.5 + .125) = 1.6
        [0.8, 0.2]
    """

    requires_positive_losses: ClassVar[bool] = True
    logits: Tensor
    previous_losses: Tensor
    previous_present: Tensor

    def __init__(
        self, tasks: Sequence[TaskSpec | str], *, beta: float = 0.025, gamma: float = 0.001
    ) -> None:
        super().__init__(tasks)
        if not beta > 0:
            raise ConfigError(f"famo: beta must be > 0, found {beta!r}")
        if not gamma >= 0:
            raise ConfigError(f"famo: gamma must be >= 0, found {gamma!r}")
        self.beta = float(beta)
        self.gamma = float(gamma)
        k = self.num_tasks
        self.register_buffer("logits", torch.zeros(k))
        self.register_buffer("previous_losses", torch.zeros(k))
        self.register_buffer("previous_present", torch.zeros(k, dtype=torch.bool))

    def combine(self, losses: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:
        detached = losses.detach()
        self._step_logits(detached, present)
        with torch.no_grad():
            self.previous_losses.copy_(detached)
            self.previous_present.copy_(present)
        z = masked_softmax(self.logits.to(losses.dtype), present)
        shifted = torch.where(present, losses.clamp_min(0) + EPS, torch.ones_like(losses))
        ratios = zero_absent(z / shifted.detach(), present)
        c = 1.0 / ratios.sum().clamp_min(tiny(losses.dtype))
        total = (c * z * torch.log(shifted)).sum()
        return total, c * ratios

    def update(
        self,
        losses_after: Mapping[str, Tensor] | Sequence[Tensor] | Tensor,
        present: Tensor | None = None,
    ) -> None:
        """The paper's exact logit update: ``losses_after`` are the same batch's losses after the
        optimizer step (``present`` defaults to the tasks present in the last call)."""
        after = stack_losses(self.task_names, losses_after).detach()
        if present is None:
            present = self.previous_present.clone()
        self._step_logits(after, present)
        with torch.no_grad():
            self.previous_present.zero_()

    @torch.no_grad()
    def _step_logits(self, after: Tensor, present: Tensor) -> None:
        both = self.previous_present & present
        before = self.previous_losses
        after = after.to(before.dtype)
        delta = torch.log(before.clamp_min(0) + EPS) - torch.log(after.clamp_min(0) + EPS)
        delta = zero_absent(delta, both)
        z = masked_softmax(self.logits, both)
        direction = z * (delta - (z * delta).sum())
        stepped = self.logits - self.beta * (direction + self.gamma * self.logits)
        self.logits.copy_(torch.where(both.any(), stepped, self.logits))
