"""Gradient-conflict diagnostics: do the tasks pull the shared parameters apart?

Every ``every`` optimizer steps, ``GradientDiagnostics`` measures the geometry of the task
gradients ``g_k = ∇L_k`` on the shared parameters and of the update ``d`` the balancer wrote
there (its ``.grad``, before clipping and the optimizer):

- ``cosine``: the K×K matrix ``G_ij / sqrt(G_ii G_jj)`` of the Gramian ``G_ij = ⟨g_i, g_j⟩``
  (negative entries are conflicting tasks);
- ``norms``: ``‖g_k‖ = sqrt(G_kk)``;
- ``update_inner``: ``⟨g_k, d⟩``; negative means the step pushes task k uphill (to first order,
  its loss grows).

Where it comes from. A gradient method (``engine.GradientAggregator`` at the parameters level)
forms the task-gradient geometry anyway: it reports it through its ``geometry_observer`` on the
observed step (the layer-wise Gramian ``G`` and ``G w`` for a Gramian weighting, ``J Jᵀ`` and
``J d`` on the Jacobian path), so a diagnostic step costs nothing extra. For a loss weighting,
a representation-level method, steps that reuse weights (``update_every``) and accumulated
micro-batches, the per-task Jacobian of the shared parameters is computed on the diagnostic step
only (one batched ``torch.autograd.grad`` that keeps the graph for the balancer), and ``d`` is
read from the ``.grad`` it wrote. With accumulation, ``g_k`` and ``d`` are the means over the
step's micro-batches; under DDP the Jacobian is averaged over processes (``d`` already is), so
every process records the global step.

The values stay on the device during the epoch and are read once at its end
(``end_epoch``): no host synchronisation on the training hot path. A task without a labelled
sample in the step gets ``nan`` (``null`` in ``metrics.jsonl``) in its row and column.

Example, a hand-written loop:
    >>> import torch
    >>> from polytask.balancing import BALANCERS
    >>> from polytask.models import build_model
    >>> from polytask.tasks import TaskSpec
    >>> tasks = [TaskSpec("a", "regression"), TaskSpec("b", "regression")]
    >>> model = build_model(tasks, (4,), encoder_params={"hidden": [8]})
    >>> balancer = BALANCERS.get("equal")(tasks)
    >>> diagnostics = GradientDiagnostics(balancer, model.shared_parameters(), every=1)
    >>> x, y = torch.randn(16, 4), {"a": torch.randn(16), "b": torch.randn(16)}
    >>> out = model(x).outputs
    >>> losses = torch.stack([t.compute_loss(out[t.name], y[t.name])[0] for t in tasks])
    >>> _ = diagnostics.at(0).backward(losses, present=torch.tensor([True, True]))
    >>> record = diagnostics.end_epoch()["diagnostics"]
    >>> record["steps"], round(record["cosine"][0][0][0], 6)
    ([1], 1.0)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from polytask.balancing.base import Balancer, BalanceResult
from polytask.balancing.engine import GradientAggregator
from polytask.balancing.jacobian import flatten_jacobian, gramian, task_jacobian
from polytask.errors import ConfigError
from polytask.io import json_ready

__all__ = ["GradientDiagnostics", "geometry"]


def geometry(gram: Tensor, inner: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(cosines ``[k, k]``, norms ``[k]``, inner products ``[k]``) from the Gramian ``[k, k]`` of
    k task gradients and their inner products ``[k]`` with the update; a zero gradient has
    ``nan`` cosines.

    Example:
        >>> cos, norms, inner = geometry(torch.tensor([[4.0, -2.0], [-2.0, 4.0]]),
        ...                              torch.tensor([2.0, 2.0]))
        >>> cos.tolist(), norms.tolist()
        ([[1.0, -0.5], [-0.5, 1.0]], [2.0, 2.0])
    """
    norms = gram.diagonal().clamp_min(0).sqrt()
    cosine = (gram / (norms[:, None] * norms[None, :])).clamp(-1.0, 1.0)  # 0/0 stays nan
    return cosine, norms, inner.to(gram.dtype)


class _ObservedStep:
    """One diagnostic optimizer step: what the loop calls ``backward`` on, once per
    micro-batch; it calls the balancer and keeps the step's geometry."""

    def __init__(self, owner: GradientDiagnostics, step: int, micro_batches: int) -> None:
        self.owner, self.step, self.micro_batches = owner, step, micro_batches
        self.calls = 0
        self.jacobian: Tensor | None = None
        balancer = owner.balancer
        # the balancer reports the geometry itself when it forms it for this very update
        self.reported = (
            micro_batches == 1
            and isinstance(balancer, GradientAggregator)
            and balancer.level == "parameters"
            and int(balancer.steps) % balancer.update_every == 0
        )

    def backward(
        self,
        losses: Tensor,
        *,
        shared_params: Sequence[Tensor] | None = None,
        features: Tensor | None = None,
        present: Tensor | None = None,
        grad_scale: Tensor | float = 1.0,
    ) -> BalanceResult:
        """The balancer's ``backward`` (same arguments and result), observed."""
        self.calls += 1
        kwargs: dict[str, Any] = dict(
            shared_params=shared_params, features=features, present=present, grad_scale=grad_scale
        )
        if self.reported:
            return self._reported_backward(losses, kwargs)
        shared = self.owner.trainable_shared()
        block = _shared_jacobian(losses.reshape(-1), shared)
        self.jacobian = block if self.jacobian is None else self.jacobian + block
        result = self.owner.balancer.backward(losses, **kwargs)
        if self.calls == self.micro_batches:
            jacobian = self.jacobian / self.micro_batches
            if self.owner.balancer.reducer is not None:  # under DDP: the global gradients
                jacobian = self.owner.balancer.reducer.mean(jacobian)
            update = _written_update(shared, jacobian) / (grad_scale * self.micro_batches)
            self.owner.keep(self.step, *geometry(gramian(jacobian), jacobian @ update), present)
            self.jacobian = None
        return result

    def _reported_backward(self, losses: Tensor, kwargs: dict[str, Any]) -> BalanceResult:
        balancer = self.owner.balancer
        assert isinstance(balancer, GradientAggregator)
        seen: list[tuple[Tensor, Tensor, Tensor | None]] = []
        balancer.geometry_observer = lambda gram, inner, rows: seen.append((gram, inner, rows))
        try:
            result = balancer.backward(losses, **kwargs)
        finally:
            balancer.geometry_observer = None
        if seen:
            gram, inner, rows = seen[-1]
            self.owner.keep(self.step, *geometry(gram, inner), None, rows=rows)
        else:  # no task had a labelled sample: the method formed nothing
            k = self.owner.num_tasks
            nan = losses.new_full((k,), float("nan"))
            self.owner.keep(self.step, nan.new_full((k, k), float("nan")), nan, nan, None)
        return result


def _shared_jacobian(losses: Tensor, shared: Sequence[Tensor]) -> Tensor:
    """The K×P Jacobian of ``losses`` (float32 or wider), keeping the graph for the balancer's
    backward. On the CPU, one backward per task: vmap's batched backward falls back to a slow
    path for convolutions there (2× slower on the multi-digits CNN), and is no faster for MLPs."""
    batched = losses.device.type != "cpu"
    blocks = task_jacobian(losses, shared, retain_graph=True, batched=batched)
    jacobian = flatten_jacobian(blocks, shared, losses.numel())
    return jacobian if jacobian.dtype in (torch.float32, torch.float64) else jacobian.float()


def _written_update(shared: Sequence[Tensor], like: Tensor) -> Tensor:
    """The shared parameters' ``.grad`` as one vector ``[P]`` (zeros where none was written)."""
    parts = [p.grad.reshape(-1) if p.grad is not None else p.new_zeros(p.numel()) for p in shared]
    return torch.cat(parts).to(like.dtype)


class GradientDiagnostics:
    """Observes the balancer's update every ``every`` optimizer steps (0: never).

    Args:
        balancer: the loop's balancer (the one it calls ``backward`` on).
        shared: the model's shared parameters (``model.shared_parameters()``); those that do not
            require a gradient at the step are left out.
        every: observe the steps ``1, every + 1, 2·every + 1, ...`` (counted from 1); 0 is off.
            Under DDP the balancer's ``reducer`` averages the task gradients over processes.

    The loop calls ``at(step, micro_batches).backward(...)`` instead of ``balancer.backward``
    (``step`` counted from 0): off the observed steps that is the balancer itself.
    """

    def __init__(
        self,
        balancer: Balancer,
        shared: Sequence[Tensor],
        *,
        every: int = 0,
    ) -> None:
        if every < 0:
            raise ConfigError(f"balancing.diagnostics.every must be >= 1, found {every}")
        self.balancer = balancer
        self.shared = shared  # the loop's own list: it may refill it when parameters unfreeze
        self.every = every
        self.num_tasks = balancer.num_tasks
        self._step: _ObservedStep | None = None
        self._steps: list[int] = []
        self._rows: list[Tensor] = []  # per step [K, K + 2]: cosines | norms | inner products

    def at(self, step: int, micro_batches: int = 1) -> Balancer | _ObservedStep:
        """What to call ``backward`` on for each micro-batch of optimizer step ``step``."""
        if self.every <= 0 or step % self.every != 0:
            return self.balancer
        current = self._step
        if current is None or current.step != step or current.calls >= current.micro_batches:
            current = self._step = _ObservedStep(self, step, micro_batches)
        return current

    def trainable_shared(self) -> list[Tensor]:
        """The shared parameters that take a gradient now (freezing may change per epoch)."""
        return [p for p in self.shared if p.requires_grad]

    def keep(
        self,
        step: int,
        cosine: Tensor,
        norms: Tensor,
        inner: Tensor,
        present: Tensor | None,
        *,
        rows: Tensor | None = None,
    ) -> None:
        """Store one step's geometry (on the device): of all K tasks, with absent ones masked
        by ``present``; or of the present tasks ``rows`` only, placed in a ``nan`` K×K."""
        k = self.num_tasks
        block = torch.cat([cosine, norms[:, None], inner[:, None]], dim=1).detach()
        if rows is not None:
            full = block.new_full((k, k + 2), float("nan"))
            columns = torch.cat([rows, torch.arange(k, k + 2, device=rows.device)])
            full[rows[:, None].to(block.device), columns[None, :].to(block.device)] = block
            block = full
        elif present is not None:
            mask = present[:, None] & torch.cat([present, present.new_ones(2)])[None, :]
            block = torch.where(mask.to(block.device), block, torch.full_like(block, float("nan")))
        self._steps.append(step + 1)
        self._rows.append(block if block.dtype == torch.float64 else block.float())

    def end_epoch(self) -> dict[str, Any]:
        """``{"diagnostics": {...}}`` with the steps observed since the last call (one host
        read; ``None`` for an absent task), or ``{}`` when off; see the module docstring."""
        if self.every <= 0:
            return {}
        rows = [row.to(torch.float64) for row in self._rows]
        values: list[Any] = torch.stack(rows).tolist() if rows else []
        k = self.num_tasks
        record: Mapping[str, Any] = {
            "tasks": list(self.balancer.task_names),
            "steps": list(self._steps),
            "cosine": [[row[:k] for row in step] for step in values],
            "norms": [[row[k] for row in step] for step in values],
            "update_inner": [[row[k + 1] for row in step] for step in values],
        }
        self._steps, self._rows, self._step = [], [], None
        return {"diagnostics": json_ready(record)}  # nan (absent task) -> None
