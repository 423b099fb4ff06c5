"""The engine of the gradient methods: what every method that looks at the task gradients needs.

A ``GradientAggregator`` turns the task losses into one update in five steps, and leaves only
the last one to the method:

1. **present rows**: tasks absent from the batch (no labelled sample) are dropped from this
   step; the task index of each remaining row (``rows``) is handed to the method, whose per-task
   state (targets, EMAs, preferences) follows its tasks; absent tasks are reported with weight 0;
2. **task-specific parameters** (the heads) receive the ordinary gradient of their own loss;
3. **the geometry of the shared gradients**, from one of two sources (``sources``): the
   layer-wise Gramian where the model and method allow it, else the K×P Jacobian of one batched
   backward (with respect to the shared parameters, or at ``level="features"`` to the shared
   representation, as in MGDA-UB); under DDP the Jacobian and the loss values are averaged over
   processes, so every process takes the decision of one process that saw the whole batch;
4. **update_every**: a method that is a weighting of the Gramian (``GramianWeightingAggregator``)
   may recompute its weights every N steps and, in between, reuse them with a plain backward of
   ``Σ w_k L_k`` (no Jacobian at all), as Navon et al. (2022) do for Nash-MTL;
5. **the method**: ``weights_from_gramian(gramian, losses, rows) -> weights`` for a Gramian
   weighting, ``aggregate(jacobian, losses, rows) -> (update, weights)`` otherwise.

Every gradient written is multiplied by ``grad_scale``; the method sees unscaled values.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import ClassVar, Literal

import torch
from torch import Tensor

from polytask.balancing.base import Balancer, BalanceResult, stack_losses
from polytask.balancing.jacobian import gramian
from polytask.balancing.reduce import Reducer
from polytask.balancing.sources import GramianSource, JacobianSource
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


def present_rows(num_rows: int, num_tasks: int, rows: Tensor | None, name: str) -> Tensor:
    """Indices of the balancer's tasks that the ``num_rows`` rows of a Jacobian belong to:
    ``rows`` when given, else all tasks (which needs ``num_rows == num_tasks``)."""
    if rows is not None:
        if rows.numel() != num_rows:
            raise ValueError(
                f"{name}: rows has {rows.numel()} entries for {num_rows} Jacobian rows"
            )
        return rows
    if num_rows != num_tasks:
        raise ValueError(
            f"{name} keeps per-task state for {num_tasks} tasks but the Jacobian has {num_rows} "
            "rows; pass rows= (the task index of each row) or call backward(..., present=...)"
        )
    return torch.arange(num_tasks)


def clip_weights(weights: Tensor, gramian: Tensor, max_norm: float, *, eps: float = 1e-6) -> Tensor:
    """Scale ``weights`` so the update ``wᵀJ`` has norm at most ``max_norm`` (``‖wᵀJ‖² = wᵀGw``),
    as ``torch.nn.utils.clip_grad_norm_`` would (factor ``max_norm / (norm + eps)``, capped at 1);
    ``max_norm <= 0`` disables it.

    Example:
        >>> clip_weights(torch.tensor([3.0, 4.0]), torch.eye(2), 1.0, eps=0.0)
        tensor([0.6000, 0.8000])
    """
    if max_norm <= 0:
        return weights
    g = gramian.to(torch.float64)
    w = weights.to(torch.float64)
    norm = (w @ g @ w).clamp_min(0.0).sqrt()
    factor = (max_norm / (norm + eps)).clamp(max=1.0)
    return (w * factor).to(weights.dtype)


class GradientAggregator(Balancer):
    """Base class of the methods that aggregate per-task gradients (the engine; see the module
    docstring). A method implements ``aggregate(jacobian, losses, rows)``.

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
    #: use the layer-wise Gramian when ``attach(model)`` found the model eligible; set it to
    #: False on an instance before ``attach`` to force the batched Jacobian
    use_autogram: bool = True
    #: gradient diagnostics (``balancing.diagnostics``) set it on the steps they observe: called
    #: with the Gramian of the present tasks' shared gradients, their inner products with the
    #: update written (both unscaled) and the rows' task indices (``None``: all tasks)
    geometry_observer: Callable[[Tensor, Tensor, Tensor | None], None] | None = None
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
        self.jacobian_source = JacobianSource(features=level == "features")
        self.gramian_source = GramianSource(active=self._gramian_wanted, owner=type(self).__name__)
        self._task_parameters: list[Tensor] | None = None
        self.register_buffer("last_weights", torch.ones(self.num_tasks))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def aggregate(
        self, jacobian: Tensor, losses: Tensor, rows: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """(update ``[P]``, weights ``[K]``) from the Jacobian ``[K, P]`` of the present tasks
        and their losses ``[K]``; ``rows`` holds the task index of each row (``None``: the rows
        are all tasks, in order)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ one step
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
        shared = self._shared_inputs(shared_params, features)
        step = int(self.steps)
        self.steps += 1
        if step % self.update_every != 0:
            return self._reuse_weights(vector, shared, present, grad_scale)
        rows = None if present is None or bool(present.all()) else present.nonzero().squeeze(1)
        kept = vector if rows is None else vector[rows]
        self._task_gradients(kept, shared, grad_scale)
        if kept.numel() == 0:
            return BalanceResult(weights=torch.zeros_like(vector), loss=vector.sum().detach())
        weights = self._shared_gradients(kept, shared, rows, grad_scale)
        full = torch.zeros_like(vector)
        if rows is None:
            full = weights.to(vector.dtype)
        else:
            full[rows] = weights.to(vector.dtype)
        # an absent task keeps its last weight for the steps that reuse weights
        kept_weights = full.detach()
        if present is not None and rows is not None:
            kept_weights = torch.where(present, kept_weights, self.last_weights.to(full.dtype))
        self.last_weights.copy_(kept_weights)
        return BalanceResult(weights=full.detach(), loss=vector.sum().detach())

    def _reuse_weights(
        self,
        vector: Tensor,
        shared: Sequence[Tensor],
        present: Tensor | None,
        scale: Tensor | float,
    ) -> BalanceResult:
        """A step between recomputations: a plain backward of ``Σ w_k L_k`` with the last
        weights (absent tasks weighted 0), clipped to ``max_norm`` like a recompute step."""
        weights = self.last_weights.to(vector.dtype)
        if present is not None:
            weights = torch.where(present, weights, torch.zeros_like(weights))
        total = (weights * vector).sum()
        (total * scale).backward()
        if self.reducer is not None:
            self._reduce_grads([*shared, *self._task_params(shared, vector)])
        if self.max_norm > 0 and self.level == "parameters":
            limit = self.max_norm * scale  # a tensor under fp16 loss scaling
            torch.nn.utils.clip_grad_norm_(shared, limit)  # type: ignore[arg-type]
        return BalanceResult(weights=weights.detach(), loss=total.detach())

    def _task_gradients(
        self, kept: Tensor, shared: Sequence[Tensor], scale: Tensor | float
    ) -> None:
        """Task-specific parameters get the ordinary gradient of their own loss: the gradient of
        the sum, taken only with respect to them (the graph is kept for the shared gradients)."""
        task_params = self._task_params(shared, kept)
        if task_params:
            torch.autograd.backward(kept.sum() * scale, inputs=task_params, retain_graph=True)
            if self.reducer is not None:  # the Trainer runs this under DDP's no_sync
                self._reduce_grads(task_params)

    def _shared_gradients(
        self, kept: Tensor, shared: Sequence[Tensor], rows: Tensor | None, scale: Tensor | float
    ) -> Tensor:
        """Write the method's update of the shared inputs; return its weights ``[k]``."""
        values = kept.detach()
        if self._gramian_allowed():
            layerwise = self.gramian_source.collect(kept * scale, scale, shared)
            if layerwise is not None:  # Σ_k w_k ∇L_k from the layers' activations
                weights = self.weights_from_gramian(layerwise.gramian, values, rows)
                weights = weights.to(layerwise.gramian.dtype)
                if self.geometry_observer is not None:
                    self.geometry_observer(layerwise.gramian, layerwise.gramian @ weights, rows)
                layerwise.apply(weights)
                return weights
        step = self.jacobian_source.collect(kept * scale, scale, shared, self.reducer)
        if self.reducer is not None:  # the global losses, identical everywhere
            values = self.reducer.mean(values)
        update, weights = self.aggregate(step.jacobian, values, rows)
        if self.geometry_observer is not None and not step.features:
            self.geometry_observer(gramian(step.jacobian), step.jacobian @ update, rows)
        step.apply(update * scale)
        return weights

    def weights_from_gramian(
        self, gramian: Tensor, losses: Tensor, rows: Tensor | None = None
    ) -> Tensor:
        """The weights of a Gramian weighting (only ``GramianWeightingAggregator`` has them)."""
        raise NotImplementedError(f"{type(self).__name__} is not a weighting of the Gramian")

    # ------------------------------------------------------------------ plumbing
    def _gramian_wanted(self) -> bool:
        """Whether the layer-wise hooks should capture the next forward: its ``backward``
        recomputes the weights (``update_every``) and may use the layer-wise Gramian."""
        return int(self.steps) % self.update_every == 0 and self._gramian_allowed()

    def _gramian_allowed(self) -> bool:
        """Whether the layer-wise Gramian may be used: a model is hooked, not under DDP (a
        sharded batch's Gramian has cross-process terms), and the update is ``wᵀJ``."""
        return (
            self.use_autogram
            and self.gramian_source.ready
            and self.reducer is None
            and self.level == "parameters"
            and self._is_gramian_weighting()
        )

    def _is_gramian_weighting(self) -> bool:
        return False

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
        gradient of their own task's loss (the model's ``task_parameters()``); and hook the
        model's shared linear layers for the layer-wise Gramian where it may be used."""
        params = getattr(model, "task_parameters", None)
        if params is not None:
            self._task_parameters = [p for p in params() if p.requires_grad]
        self.gramian_source.detach()
        if self.use_autogram and self._is_gramian_weighting() and self.level == "parameters":
            self.gramian_source.attach(model)

    def _task_params(self, shared: Sequence[Tensor], losses: Tensor) -> list[Tensor]:
        """The non-shared leaves the losses depend on: from ``attach(model)``, else found once by
        walking the autograd graph."""
        if self._task_parameters is None:
            shared_ids = {id(t) for t in shared}
            # at the features level the walk stops at the features: the encoder below them is
            # not a task's
            stop = shared if self.level == "features" else ()
            leaves = graph_leaves(losses, stop=stop)
            self._task_parameters = [t for t in leaves if id(t) not in shared_ids]
        return self._task_parameters


class GramianWeightingAggregator(GradientAggregator):
    """A method defined as a weighting of the Gramian ``G = J Jᵀ``: the update is ``wᵀ J``.

    Implement ``weights_from_gramian(gramian, losses, rows=None)``.
    """

    linear_in_jacobian: ClassVar[bool] = True

    def weights_from_gramian(
        self, gramian: Tensor, losses: Tensor, rows: Tensor | None = None
    ) -> Tensor:
        """Weights ``[K]`` from the Gramian ``[K, K]`` (float32/64) of the present tasks, their
        losses and the task index of each row (``None``: all tasks, in order)."""
        raise NotImplementedError

    def aggregate(
        self, jacobian: Tensor, losses: Tensor, rows: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        weights = self.weights_from_gramian(gramian(jacobian), losses, rows).to(jacobian.dtype)
        return weights @ jacobian, weights

    def _is_gramian_weighting(self) -> bool:
        # a subclass that overrides ``aggregate`` is not ``wᵀJ`` any more
        return type(self).aggregate is GramianWeightingAggregator.aggregate


__all__ = [
    "GradientAggregator",
    "GramianWeightingAggregator",
    "Level",
    "clip_weights",
    "graph_leaves",
    "present_rows",
]
