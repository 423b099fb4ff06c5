"""The balancer interface: how K task losses become one update, from any PyTorch loop.

A ``Balancer`` takes the per-task losses (and, where its method needs them, the shared
parameters or the shared features), fills ``.grad`` of every parameter that the losses depend on,
and returns a ``BalanceResult`` saying what it decided (the task weights). It holds its state
explicitly (learnable parameters, buffers, EMAs) so ``state_dict()`` checkpoints it.

Example, a hand-written loop:
    >>> import torch
    >>> from polytask.balancing import BALANCERS
    >>> from polytask.models import build_model
    >>> from polytask.tasks import TaskSpec
    >>> tasks = [TaskSpec("a", "regression"), TaskSpec("b", "binary")]
    >>> model = build_model(tasks, (4,), encoder_params={"hidden": [8]})
    >>> balancer = BALANCERS.get("uncertainty")(tasks)
    >>> opt = torch.optim.AdamW([*model.parameters(), *balancer.parameters()], lr=1e-2)
    >>> x, y = torch.randn(16, 4), {"a": torch.randn(16), "b": torch.rand(16).round()}
    >>> out = model(x).outputs
    >>> losses = {t.name: t.compute_loss(out[t.name], y[t.name])[0] for t in tasks}
    >>> opt.zero_grad()
    >>> result = balancer.backward(losses, shared_params=model.shared_parameters())
    >>> opt.step()
    >>> result.weights.shape
    torch.Size([2])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor, nn

from polytask.balancing.reduce import Reducer
from polytask.errors import ConfigError
from polytask.registry import Registry
from polytask.tasks import TaskSpec

BALANCERS: Registry = Registry("balancing method", provided=("tasks",))


@dataclass
class BalanceResult:
    """What a balancer decided for one step (all tensors detached, on the losses' device)."""

    weights: Tensor
    loss: Tensor
    extras: dict[str, Tensor] = field(default_factory=dict)


def task_names(tasks: Sequence[TaskSpec | str]) -> list[str]:
    """Task names from specs or plain strings."""
    return [t if isinstance(t, str) else t.name for t in tasks]


def stack_losses(
    names: Sequence[str], losses: Mapping[str, Tensor] | Sequence[Tensor] | Tensor
) -> Tensor:
    """The K losses as one vector in the balancer's task order."""
    if isinstance(losses, Tensor):
        vector = losses.reshape(-1)
    elif isinstance(losses, Mapping):
        missing = [n for n in names if n not in losses]
        if missing:
            raise KeyError(f"losses lack tasks {missing}; the balancer was built for {list(names)}")
        vector = torch.stack([losses[n].reshape(()) for n in names])
    else:
        vector = torch.stack([loss.reshape(()) for loss in losses])
    if vector.numel() != len(names):
        raise ValueError(f"expected {len(names)} losses, found {vector.numel()}")
    return vector


def present_mask(vector: Tensor, present: Tensor | None) -> Tensor:
    """``present``, or every task present (a bool vector like ``vector``) when ``None``."""
    return torch.ones_like(vector, dtype=torch.bool) if present is None else present


def is_unit(scale: Tensor | float) -> bool:
    """Whether ``scale`` is the float 1.0 (no scaling: a tensor always counts as a scale)."""
    return isinstance(scale, float) and scale == 1.0


class Balancer(nn.Module):
    """Base class of every balancing method.

    Subclasses declare what they need with class attributes, so a training loop asks instead of
    branching on method names: ``needs_shared_params`` (per-task gradients of the shared
    parameters) and ``needs_features`` (gradients with respect to the shared representation).
    """

    needs_shared_params: ClassVar[bool] = False
    needs_features: ClassVar[bool] = False
    #: under DDP, the method reduces gradients itself (the loop runs it under ``no_sync``)
    reduces_own_gradients: ClassVar[bool] = False
    #: the method takes ratios or logarithms of the losses (they must be positive)
    requires_positive_losses: ClassVar[bool] = False
    #: the method honours ``grad_scale`` (mixed-precision loss scaling, gradient accumulation)
    supports_grad_scale: ClassVar[bool] = False
    #: one step is device work only, with no host state: it can be replayed from a CUDA graph
    #: (``train.cuda_graph``)
    captures_in_cuda_graph: ClassVar[bool] = False

    def __init__(self, tasks: Sequence[TaskSpec | str]) -> None:
        super().__init__()
        self.tasks = list(tasks)
        self.task_names = task_names(tasks)
        self.reducer: Reducer | None = None

    def check_grad_scale(self, grad_scale: Tensor | float) -> None:
        """Raise ``ConfigError`` when ``grad_scale`` is not the float 1.0 and the method does not
        declare ``supports_grad_scale`` (every ``backward`` calls it first)."""
        if not self.supports_grad_scale and not is_unit(grad_scale):
            raise ConfigError(
                f"{type(self).__name__} does not support fp16 loss scaling or gradient "
                "accumulation; use precision bf16/fp32 and accumulate_steps 1"
            )

    def distribute(self, reducer: Reducer | None) -> None:
        """Run under data parallelism: ``reducer`` averages over processes (see
        ``polytask.balancing.reduce``). The losses given to ``backward`` are then each process's
        local surrogates, and the balancer makes every process take the same decision as one
        process that saw the whole batch."""
        self.reducer = reducer

    def attach(self, model: nn.Module) -> None:
        """Called once with the model before training (methods that need to know which
        parameters are task-specific read them here); a no-op by default."""

    @property
    def num_tasks(self) -> int:
        return len(self.task_names)

    def backward(
        self,
        losses: Mapping[str, Tensor] | Sequence[Tensor] | Tensor,
        *,
        shared_params: Sequence[Tensor] | None = None,
        features: Tensor | None = None,
        present: Tensor | None = None,
        grad_scale: Tensor | float = 1.0,
    ) -> BalanceResult:
        """Fill ``.grad`` from ``losses``; ``present`` (bool ``[K]``) marks the tasks that had a
        labelled sample this step (all of them when ``None``). Every gradient written is
        multiplied by ``grad_scale`` (the fp16 loss scale divided by the number of accumulated
        micro-batches) while the method sees the unscaled loss values; methods without
        ``supports_grad_scale`` accept only 1.0."""
        raise NotImplementedError


class LossWeighting(Balancer):
    """A method that combines the losses into one scalar and back-propagates it once."""

    supports_grad_scale: ClassVar[bool] = True

    def combine(self, losses: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:
        """(scalar to back-propagate, weights ``[K]``) for the loss vector ``losses``."""
        raise NotImplementedError

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
        present = present_mask(vector, present)
        if self.reducer is None:
            total, weights = self.combine(vector, present)
            (total if is_unit(grad_scale) else total * grad_scale).backward()
            return BalanceResult(weights=weights.detach(), loss=total.detach())
        return self._distributed_backward(vector, present, grad_scale)

    def _distributed_backward(
        self, vector: Tensor, present: Tensor, grad_scale: Tensor | float
    ) -> BalanceResult:
        """Linearise the combination at the global loss values: every process evaluates
        ``combine`` on the same (averaged) values, takes ``∂total/∂L_k`` as the weights, and
        back-propagates ``Σ_k ∂total/∂L_k · L_k^local``; DDP's average of those gradients is the
        gradient of ``total`` at the global batch. The balancer's own parameters get their
        gradient from the global values directly (identical on every process)."""
        assert self.reducer is not None
        values = self.reducer.mean(vector.detach()).requires_grad_(True)
        total, weights = self.combine(values, present)
        own = [p for p in self.parameters() if p.requires_grad]
        grads = torch.autograd.grad(total, [values, *own], allow_unused=True)
        d_values = grads[0] if grads[0] is not None else torch.zeros_like(values)
        ((d_values.detach() * vector).sum() * grad_scale).backward()
        for p, g in zip(own, grads[1:], strict=True):
            if g is not None:
                g = g * grad_scale
                p.grad = g if p.grad is None else p.grad + g
        return BalanceResult(weights=weights.detach(), loss=total.detach())
