"""Gradient aggregation: methods that look at every task's gradient before the update.

A ``GradientAggregator`` receives the K×P Jacobian of the task losses with respect to the shared
parameters (or, at ``level="features"``, with respect to the shared representation, as in
MGDA-UB), computed in one batched backward, and returns one update direction. Task-specific
parameters (the heads) receive the ordinary gradient of their own task's loss.

Where a method's paper allows it, the method is a *weighting of the Gramian*: subclass
``GramianWeightingAggregator`` and implement ``weights_from_gramian(G) -> w``; the update is
``wᵀ J``. Such methods accept ``update_every=N``: the weights are recomputed every N steps and,
in between, reused with a plain backward of ``Σ w_k L_k`` (no Jacobian at all), as Navon et al.
(2022) do for Nash-MTL.

Tasks absent from a batch (no labelled sample) are dropped from that step's Jacobian; their
weight is reported as 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar, Literal, cast

import torch
from torch import Tensor

from polytask.balancing.autogram import LayerwiseGramian, LayerwiseStep
from polytask.balancing.base import Balancer, BalanceResult, stack_losses
from polytask.balancing.jacobian import flatten_jacobian, gramian, task_jacobian
from polytask.balancing.reduce import Reducer
from polytask.errors import ConfigError
from polytask.tasks import TaskSpec

Level = Literal["parameters", "features"]


def graph_leaves(output: Tensor, *, stop: Sequence[Tensor] = ()) -> list[Tensor]:
    """Every leaf tensor requiring grad that ``output`` depends on (walks the autograd graph),
    not looking below the tensors in ``stop`` (e.g. the shared features)."""
    seen: set[int] = {id(t.grad_fn) for t in stop if t.grad_fn is not None}
    leaves: list[Tensor] = []
    stack = [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        variable = getattr(node, "variable", None)
        if variable is not None:
            leaves.append(variable)
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    return leaves


class GradientAggregator(Balancer):
    """Base class of the methods that aggregate per-task gradients.

    Args:
        tasks: the tasks, in the order of the losses.
        level: ``parameters`` (per-task gradients of the shared parameters) or ``features``
            (gradients with respect to the shared representation: cheaper for large encoders).
        update_every: recompute the aggregation every N steps (Gramian weightings only).
    """

    #: whether the update is ``weights @ jacobian`` (so weights can be reused between steps)
    linear_in_jacobian: ClassVar[bool] = False
    #: under DDP, gradients are reduced by the method itself (run its backward in ``no_sync``)
    reduces_own_gradients: ClassVar[bool] = True
    #: clip the shared gradient to this norm on steps that reuse weights (0 = off); methods
    #: whose authors clip (Nash-MTL, FairGrad) set it
    max_norm: float = 0.0
    supports_grad_scale: ClassVar[bool] = True
    last_weights: Tensor
    steps: Tensor

    def __init__(
        self,
        tasks: Sequence[TaskSpec | str],
        *,
        level: Level = "parameters",
        update_every: int = 1,
    ) -> None:
        super().__init__(tasks)
        if level not in ("parameters", "features"):
            raise ConfigError(f"level must be 'parameters' or 'features', found {level!r}")
        if update_every < 1:
            raise ConfigError(f"update_every must be >= 1, found {update_every}")
        if update_every > 1 and not self.linear_in_jacobian:
            raise ConfigError(
                f"{type(self).__name__} does not support update_every > 1 (its update is not a "
                "weighting of the task gradients)"
            )
        self.level = level
        self.update_every = update_every
        self.needs_shared_params = level == "parameters"  # type: ignore[misc]
        self.needs_features = level == "features"  # type: ignore[misc]
        self._rows: Tensor | None = None
        self.register_buffer("last_weights", torch.ones(self.num_tasks))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def aggregate(self, jacobian: Tensor, losses: Tensor) -> tuple[Tensor, Tensor]:
        """(update ``[P]``, weights ``[K]``) from the Jacobian ``[K, P]`` of the present tasks
        and their losses ``[K]``. During ``backward``, ``self._rows`` holds the task index of
        each row when some tasks are absent (``None``: the rows are all tasks, in order)."""
        raise NotImplementedError

    def backward(
        self,
        losses: Mapping[str, Tensor] | Sequence[Tensor] | Tensor,
        *,
        shared_params: Sequence[Tensor] | None = None,
        features: Tensor | None = None,
        present: Tensor | None = None,
    ) -> BalanceResult:
        vector = stack_losses(self.task_names, losses)
        shared = self._shared_inputs(shared_params, features)
        step = int(self.steps)
        self.steps += 1
        if self.update_every > 1 and step % self.update_every != 0:
            weights = self.last_weights.to(vector.dtype)
            if present is not None:
                weights = torch.where(present, weights, torch.zeros_like(weights))
            total = (weights * vector).sum()
            (total * self.grad_scale).backward()
            if self.reducer is not None:
                self._reduce_grads([*shared, *self._task_params(shared, vector)])
            if self.max_norm > 0 and self.level == "parameters":
                limit = self.max_norm * self.grad_scale  # a tensor under fp16 loss scaling
                torch.nn.utils.clip_grad_norm_(shared, limit)  # type: ignore[arg-type]
            return BalanceResult(weights=weights.detach(), loss=total.detach())

        keep = None if present is None or bool(present.all()) else present.nonzero().squeeze(1)
        kept = vector if keep is None else vector[keep]
        k = kept.numel()
        # Task-specific parameters get the ordinary gradient of their own loss: the gradient of
        # the sum, taken only with respect to them (the graph is kept for the Jacobian).
        task_params = self._task_params(shared, kept)
        scale = self.grad_scale
        if task_params:
            torch.autograd.backward(kept.sum() * scale, inputs=task_params, retain_graph=True)
            if self.reducer is not None:  # the Trainer runs this under DDP's no_sync
                self._reduce_grads(task_params)
        weights_full = torch.zeros_like(vector)
        if k == 0:
            return BalanceResult(weights=weights_full, loss=vector.sum().detach())
        # >>> autogram: the layer-wise Gramian (no K×P Jacobian) where the model allows it
        layerwise = self._layerwise_gramian(kept * scale, shared)
        # <<< autogram
        values = kept.detach()
        if layerwise is None:
            # the Jacobian of the scaled losses (fp16-safe), unscaled in fp32 for the method
            blocks = task_jacobian(kept * scale, shared)
            jacobian = flatten_jacobian(blocks, shared, k)
            if jacobian.dtype not in (torch.float32, torch.float64):
                jacobian = jacobian.float()
            if not (isinstance(scale, float) and scale == 1.0):
                jacobian = jacobian / scale
            if self.reducer is not None:  # the global Jacobian and losses, identical everywhere
                jacobian = self.reducer.mean_(jacobian)
                values = self.reducer.mean(values)
        self._rows = keep  # the task index of each Jacobian row, for methods with per-task state
        try:
            if layerwise is None:
                update, weights = self.aggregate(jacobian, values)
            else:  # autogram
                g = layerwise.gramian
                gramian_method = cast("GramianWeightingAggregator", self)  # autogram: only those
                weights = gramian_method.weights_from_gramian(g, values).to(g.dtype)
        finally:
            self._rows = None
        if keep is None:
            weights_full = weights.to(vector.dtype)
        else:
            weights_full[keep] = weights.to(vector.dtype)
        # an absent task keeps its last weight for the steps that reuse weights
        kept_weights = (
            weights_full.detach()
            if keep is None
            else torch.where(
                present,  # type: ignore[arg-type]  # keep is set only when present is given
                weights_full.detach(),
                self.last_weights.to(weights_full.dtype),
            )
        )
        self.last_weights.copy_(kept_weights)
        if layerwise is None:
            self._apply_update(update * scale, shared)
        else:  # autogram: Σ_k w_k ∇L_k from the layers' activations and output gradients
            layerwise.apply(weights)
        return BalanceResult(weights=weights_full.detach(), loss=vector.sum().detach())

    # ------------------------------------------------------------------ plumbing
    def _reduce_grads(self, params: Sequence[Tensor]) -> None:
        assert self.reducer is not None
        for p in params:
            if p.grad is not None and p.requires_grad:
                self.reducer.mean_(p.grad)

    def distribute(self, reducer: Reducer | None) -> None:
        if reducer is not None and self.level == "features":
            raise ConfigError(
                f"{type(self).__name__}(level='features') is not supported under data "
                "parallelism: each process holds the feature gradients of different samples; "
                "use level='parameters'"
            )
        super().distribute(reducer)

    def _shared_inputs(
        self, shared_params: Sequence[Tensor] | None, features: Tensor | None
    ) -> list[Tensor]:
        if self.level == "features":
            if features is None:
                raise ConfigError(
                    f"{type(self).__name__}(level='features') needs the model's shared features; "
                    "this architecture returns none (use level='parameters')"
                )
            return [features]
        if not shared_params:
            raise ValueError(f"{type(self).__name__} needs shared_params= (the shared parameters)")
        return list(shared_params)

    def attach(self, model: torch.nn.Module) -> None:
        """Tell the aggregator which parameters belong to one task: they get the ordinary
        gradient of their own task's loss (the model's ``task_parameters()``)."""
        params = getattr(model, "task_parameters", None)
        if params is not None:
            self._task_parameters = [p for p in params() if p.requires_grad]
        # >>> autogram: hooks on the shared linear layers (Gramian weightings, parameters level)
        if self._autogram is not None:
            self._autogram.remove()
            self._autogram = None
        if (
            self.use_autogram
            and isinstance(self, GramianWeightingAggregator)
            and self.level == "parameters"
        ):
            self._autogram = LayerwiseGramian.attach(
                model, active=self._autogram_active, owner=type(self).__name__
            )
        # <<< autogram

    # >>> autogram
    #: use the layer-wise Gramian when ``attach(model)`` found the model eligible; set it to
    #: False on an instance to force the batched Jacobian path
    use_autogram: bool = True
    _autogram: LayerwiseGramian | None = None

    def _autogram_active(self) -> bool:
        """Whether the forward hooks should capture: the next ``backward`` recomputes the
        weights (``update_every``) and may take the layer-wise path."""
        return int(self.steps) % self.update_every == 0 and self._autogram_allowed()

    def _autogram_allowed(self) -> bool:
        """Whether the layer-wise path may be used: not under DDP (a sharded batch's Gramian
        has cross-process terms), and the method's update is ``wᵀJ``."""
        return (
            self.use_autogram
            and self.reducer is None
            and self.level == "parameters"
            and type(self).aggregate is GramianWeightingAggregator.aggregate
        )

    def _layerwise_gramian(self, losses: Tensor, shared: Sequence[Tensor]) -> LayerwiseStep | None:
        """The layer-wise Gramian of the (scaled) kept losses, or ``None``: use the Jacobian."""
        if self._autogram is None or self._autogram.failed or not self._autogram_allowed():
            return None
        return self._autogram.step(losses, self.grad_scale, shared, owner=type(self).__name__)

    # <<< autogram

    def _task_params(self, shared: Sequence[Tensor], losses: Tensor) -> list[Tensor]:
        """The non-shared leaves the losses depend on: from ``attach(model)``, else found once by
        walking the autograd graph."""
        cached = getattr(self, "_task_parameters", None)
        if cached is None:
            shared_ids = {id(t) for t in shared}
            # at the features level the walk stops at the features: the encoder below them is
            # not a task's
            stop = shared if self.level == "features" else ()
            cached = [t for t in graph_leaves(losses, stop=stop) if id(t) not in shared_ids]
            self._task_parameters = cached
        return cached

    def _apply_update(self, update: Tensor, shared: Sequence[Tensor]) -> None:
        if self.level == "features":
            (feature,) = shared
            grad = update.reshape(feature.shape).to(feature.dtype)
            torch.autograd.backward(feature, grad_tensors=grad)
            return
        offset = 0
        for p in shared:
            n = p.numel()
            g = update[offset : offset + n].view_as(p).to(p.dtype)
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.add_(g)
            offset += n


class GramianWeightingAggregator(GradientAggregator):
    """A method defined as a weighting of the Gramian ``G = J Jᵀ``: the update is ``wᵀ J``."""

    linear_in_jacobian: ClassVar[bool] = True

    def weights_from_gramian(self, gramian: Tensor, losses: Tensor) -> Tensor:
        """Weights ``[K]`` from the Gramian ``[K, K]`` (float32/64) and the losses."""
        raise NotImplementedError

    def aggregate(self, jacobian: Tensor, losses: Tensor) -> tuple[Tensor, Tensor]:
        g = gramian(jacobian)
        weights = self.weights_from_gramian(g, losses).to(jacobian.dtype)
        return weights @ jacobian, weights
