"""Two sources of the same thing: the geometry of the task gradients for one step.

A gradient method needs, for the K present tasks, either their Gramian ``G = J Jᵀ`` (then the
shared update is ``Σ_k w_k ∇L_k``) or the K×P Jacobian ``J`` itself. The engine
(``engine.GradientAggregator``) asks one of two sources:

- ``JacobianSource``: the Jacobian from ONE backward batched over the K tasks
  (``jacobian.task_jacobian``), averaged over processes under DDP. It works for every model and
  every method; its ``JacobianStep.apply`` writes any update ``[P]``.
- ``GramianSource``: the layer-wise Gramian (``layerwise.LayerwiseGramian``: forward hooks on the
  model's shared ``nn.Linear`` and ``nn.Embedding`` layers, per-task gradients of every other
  shared parameter), without ever forming the K×P ``J`` at once; only for methods that are a
  weighting of the Gramian, on one process, at the parameters level, for a model that has
  ``shared_parameters()``. Its ``LayerwiseStep.apply`` writes ``Σ_k w_k ∇L_k``.

Both take the losses already multiplied by the gradient scale (fp16 loss scale, accumulation)
and return the geometry of the unscaled losses; both write scaled gradients.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from polytask.balancing.jacobian import unscaled_jacobian
from polytask.balancing.layerwise import LayerwiseGramian, LayerwiseStep
from polytask.balancing.reduce import Reducer


@dataclass
class JacobianStep:
    """The Jacobian ``[K, P]`` of one step (unscaled, float32/64) and where updates go."""

    jacobian: Tensor
    inputs: list[Tensor]  # the shared parameters, or the one shared features tensor
    features: bool  # whether ``inputs`` is the shared features (``level="features"``)

    def apply(self, update: Tensor) -> None:
        """Add ``update`` ``[P]`` (already scaled) to the shared parameters' ``.grad``, or
        back-propagate it from the shared features through the encoder."""
        if self.features:
            (feature,) = self.inputs
            grad = update.reshape(feature.shape).to(feature.dtype)
            torch.autograd.backward(feature, grad_tensors=grad)
            return
        offset = 0
        for p in self.inputs:
            n = p.numel()
            g = update[offset : offset + n].view_as(p).to(p.dtype)
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.add_(g)
            offset += n


class JacobianSource:
    """The per-task Jacobian from one batched backward; the global one under DDP."""

    def __init__(self, *, features: bool) -> None:
        self.features = features

    def collect(
        self,
        scaled_losses: Tensor,
        scale: Tensor | float,
        inputs: Sequence[Tensor],
        reducer: Reducer | None,
    ) -> JacobianStep:
        """The Jacobian of ``scaled_losses / scale`` with respect to ``inputs``; under DDP
        (``reducer``) its mean over processes, identical everywhere."""
        # differentiate the scaled losses (fp16-safe), unscale in fp32 for the method
        jacobian = unscaled_jacobian(scaled_losses, inputs, scale)
        if reducer is not None:
            jacobian = reducer.mean_(jacobian)
        return JacobianStep(jacobian, list(inputs), self.features)


class GramianSource:
    """The layer-wise Gramian, from hooks that ``attach`` puts on a model's shared linear layers.

    ``active`` says whether the hooks should capture the next forward (the next ``backward``
    recomputes the weights and may take this path); ``owner`` names the method in warnings.
    """

    def __init__(self, *, active: Callable[[], bool], owner: str) -> None:
        self.active = active
        self.owner = owner
        self.hooks: LayerwiseGramian | None = None

    def attach(self, model: nn.Module) -> None:
        """Hook ``model``'s shared layers (replacing earlier hooks); warns once and stays off
        when the model shares no trainable parameter."""
        self.detach()
        self.hooks = LayerwiseGramian.attach(model, active=self.active, owner=self.owner)

    def detach(self) -> None:
        """Take the hooks off the model, if any."""
        if self.hooks is not None:
            self.hooks.remove()
            self.hooks = None

    @property
    def ready(self) -> bool:
        """Whether a model is hooked and its activations have not been found untrustworthy."""
        return self.hooks is not None and self.hooks.failed is None

    def collect(
        self, scaled_losses: Tensor, scale: Tensor | float, shared: Sequence[Tensor]
    ) -> LayerwiseStep | None:
        """The Gramian of ``scaled_losses / scale`` from the last forward, or ``None`` (after
        one warning, for good): use the ``JacobianSource``."""
        if self.hooks is None or self.hooks.failed is not None:
            return None
        return self.hooks.step(scaled_losses, scale, shared, owner=self.owner)
