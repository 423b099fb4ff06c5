"""The private step: per-record gradients, clipping, one Gaussian mechanism, the balancer.

For a batch of records (Poisson-sampled), each record ``i`` yields a vector ``v_i`` of ``D``
numbers, computed with ``torch.func`` (``vmap`` over the records, no Python loop):

- **loss weightings**: ``v_i`` is the gradient of the record's weighted loss
  ``Σ_k w_k ℓ_ik`` with respect to the model's parameters (and, for methods with learned
  weights, of the method's ``combine(ℓ_i)`` with respect to its own parameters too);
- **gradient aggregations**: ``v_i`` is the record's K×P Jacobian of the shared parameters
  (row ``k``: ``∇ℓ_ik``, a zero row when the record has no label for task ``k``) followed by its
  gradient of ``Σ_k ℓ_ik`` with respect to the task-specific parameters.

Then ``v_i`` is clipped to norm ``C`` (for the Jacobian: its Frobenius norm, jointly with the
head gradients), the clipped vectors are summed, Gaussian noise of standard deviation ``σ·C`` is
added once to every entry, and the result is divided by the *expected* batch size (as Opacus
does: the actual size of a Poisson batch is private). Changing one record changes the sum by at
most ``C`` in L2 norm, so the step is one Gaussian mechanism of sensitivity ``C``. A gradient
aggregator then aggregates the noisy mean Jacobian: post-processing.

Under data parallelism each process clips its share of the records, the clipped sums are added
across processes, and only rank 0 adds noise: the global batch gets the noise once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jacrev, vmap

from polytask.balancing import Balancer, GradientAggregator, LossWeighting
from polytask.data.preprocess import Inputs, inputs_to, num_rows
from polytask.models import MultiTaskModel
from polytask.privacy.methods import PrivateMode
from polytask.runtime import Runtime
from polytask.tasks import TaskSpec

__all__ = ["PrivateStep", "clip_factors", "noisy_mean", "per_record_losses", "record_losses"]

_EPS = 1e-6  # as Opacus: factor C / (norm + 1e-6)


def clip_factors(per_record: Tensor, max_norm: float) -> Tensor:
    """The factor ``min(1, C / (‖v_i‖ + 1e-6))`` of each row ``v_i`` of ``per_record`` ``[B, D]``:
    every clipped row has norm at most ``C``.

    Example:
        >>> clip_factors(torch.tensor([[3.0, 4.0], [0.3, 0.4]]), 1.0)
        tensor([0.2000, 1.0000])
    """
    norms = torch.linalg.vector_norm(per_record, dim=1)
    return (max_norm / (norms + _EPS)).clamp(max=1.0)


def noisy_mean(
    per_record: Tensor,
    *,
    max_norm: float,
    noise_multiplier: float,
    expected_batch_size: float,
    runtime: Runtime,
) -> Tensor:
    """``(Σ_i clip(v_i) + N(0, (σC)² I)) / B̄`` ``[D]`` for the rows ``v_i`` of ``per_record``
    (this process's records); under data parallelism the sum runs over every process's records
    and rank 0 alone adds the noise, drawn from torch's global generator."""
    summed = clip_factors(per_record, max_norm) @ per_record
    if runtime.is_main and noise_multiplier > 0:
        summed = summed + torch.randn_like(summed) * (noise_multiplier * max_norm)
    if runtime.world_size > 1:
        summed = runtime.all_sum(summed)
    return summed / expected_batch_size


class _Combine(nn.Module):
    """``balancer.combine`` as a module's forward, so ``functional_call`` can swap its
    parameters for the per-record gradient of a loss weighting with learned weights."""

    def __init__(self, balancer: Balancer) -> None:
        super().__init__()
        self.balancer = balancer

    def forward(self, losses: Tensor, present: Tensor) -> Tensor:
        assert isinstance(self.balancer, LossWeighting)
        return self.balancer.combine(losses, present)[0]


def _one_record(inputs: Inputs) -> Inputs:
    if isinstance(inputs, dict):
        return {k: v.unsqueeze(0) for k, v in inputs.items()}
    return inputs.unsqueeze(0)


def record_losses(
    model: nn.Module,
    tasks: Sequence[TaskSpec],
    params: Mapping[str, Tensor],
    x: Inputs,
    y: Mapping[str, Tensor],
) -> tuple[Tensor, Tensor]:
    """(losses ``[K]``, labelled ``[K]``) of one record (no batch dimension) under the
    parameters ``params``: a task without its label has loss 0, so its row of the record's
    Jacobian is zero. Meant for ``torch.func.vmap`` over records."""
    fixed = dict(model.named_buffers())
    fixed.update({n: p for n, p in model.named_parameters() if n not in params})
    out = functional_call(model, (dict(params), fixed), (_one_record(x),))
    losses, labelled = [], []
    for t in tasks:
        target = y[t.name].unsqueeze(0)
        losses.append(t.compute_loss(out.outputs[t.name].float(), target)[0])
        labelled.append(t.label_mask(target).any())
    return torch.stack(losses), torch.stack(labelled)


def per_record_losses(
    model: nn.Module, tasks: Sequence[TaskSpec], x: Inputs, y: Mapping[str, Tensor]
) -> tuple[Tensor, Tensor]:
    """(losses ``[B, K]``, labelled ``[B, K]``) of every record of a batch, without gradients
    (e.g. for a loss-threshold membership-inference attack)."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    with torch.no_grad():
        return vmap(
            lambda xi, yi: record_losses(model, tasks, params, xi, yi),
            randomness="different",
        )(x, y)


class PrivateStep:
    """Writes a DP-SGD gradient into ``.grad`` of every trainable parameter of ``model`` (and of
    ``balancer`` for learned weights), for one Poisson-sampled batch.

    Args:
        model, balancer, tasks: what is trained; ``mode`` from ``private_mode``.
        max_grad_norm: C; ``noise_multiplier``: σ.
        expected_batch_size: B̄ = q·N, the expected size of the global batch.
        runtime: the device, and under data parallelism the processes.
    """

    def __init__(
        self,
        model: MultiTaskModel,
        balancer: Balancer,
        tasks: Sequence[TaskSpec],
        *,
        mode: PrivateMode,
        max_grad_norm: float,
        noise_multiplier: float,
        expected_batch_size: float,
        runtime: Runtime,
    ) -> None:
        self.model, self.balancer, self.tasks, self.mode = model, balancer, list(tasks), mode
        self.max_grad_norm, self.noise_multiplier = max_grad_norm, noise_multiplier
        self.expected_batch_size, self.runtime = expected_batch_size, runtime
        shared = {id(p) for p in model.shared_parameters()}
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.shared = {n: p for n, p in named if id(p) in shared}
        self.heads = {n: p for n, p in named if id(p) not in shared}
        self.own = (
            {n: p for n, p in balancer.named_parameters() if p.requires_grad}
            if mode == "learned"
            else {}
        )
        self._combine = _Combine(balancer)
        fixed = [t.weight for t in self.tasks]
        self._task_weights = torch.tensor(fixed) if any(w != 1.0 for w in fixed) else None

    # ------------------------------------------------------------------ per record
    def _record_losses(
        self, params: Mapping[str, Tensor], x: Inputs, y: Mapping[str, Tensor]
    ) -> tuple[Tensor, Tensor]:
        vector, labelled = record_losses(self.model, self.tasks, params, x, y)
        if self._task_weights is not None:
            vector = vector * self._task_weights.to(vector.device)
        return vector, labelled

    def _record_loss(
        self,
        params: Mapping[str, Tensor],
        own: Mapping[str, Tensor],
        x: Inputs,
        y: Mapping[str, Tensor],
        weights: Tensor,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """A loss weighting's loss of one record (and, as auxiliary output, its task losses)."""
        losses, labelled = self._record_losses(params, x, y)
        if self.mode == "learned":
            total = functional_call(self._combine, dict(own), (losses, labelled))
        else:
            total = (weights * losses).sum()
        return total, (losses.detach(), labelled)

    def _record_jacobian(
        self, params: Mapping[str, Tensor], x: Inputs, y: Mapping[str, Tensor]
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        losses, labelled = self._record_losses(params, x, y)
        return losses, (losses.detach(), labelled)

    def per_record(
        self, x: Inputs, y: Mapping[str, Tensor], weights: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(``v_i`` ``[B, D]``, task losses ``[B, K]``, labelled ``[B, K]``) of the records."""
        # detached: torch.func differentiates them; the outer graph must not
        params = {n: p.detach() for n, p in (*self.shared.items(), *self.heads.items())}
        own = {n: p.detach() for n, p in self.own.items()}
        if self.mode == "aggregation":
            jac_fn = jacrev(self._record_jacobian, has_aux=True)
            jac, (losses, labelled) = vmap(jac_fn, in_dims=(None, 0, 0), randomness="different")(
                params, x, y
            )
            rows = torch.cat([jac[n].flatten(2) for n in self.shared], dim=2)  # [B, K, Ps]
            heads = [jac[n].sum(1).flatten(1) for n in self.heads]  # each head: its own task
            return torch.cat([rows.flatten(1), *heads], dim=1), losses, labelled
        grad_fn = grad(self._record_loss, argnums=(0, 1), has_aux=True)
        (g_model, g_own), (losses, labelled) = vmap(
            grad_fn, in_dims=(None, None, 0, 0, None), randomness="different"
        )(params, own, x, y, weights)
        parts = [g_model[n].flatten(1) for n in params] + [g_own[n].flatten(1) for n in self.own]
        return torch.cat(parts, dim=1), losses, labelled

    # ------------------------------------------------------------------ one step
    def backward(self, x: Inputs, y: Mapping[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """Write the private gradient of the batch ``(x, y)`` into ``.grad``; return the
        (task losses, present mask, weights) ``[K]`` of the Trainer's log (the losses are
        the mean over this process's labelled records: for the log only)."""
        device = self.runtime.device
        x = inputs_to(x, device)
        y = {t.name: y[t.name].to(device, non_blocking=True) for t in self.tasks}
        k = len(self.tasks)
        weights = torch.ones(k, device=device)
        if self.mode != "aggregation":  # public or learned weights: no data involved
            assert isinstance(self.balancer, LossWeighting)
            everyone = torch.ones(k, dtype=torch.bool, device=device)
            weights = self.balancer.combine(torch.zeros(k, device=device), everyone)[1].detach()
        if num_rows(x) > 0:
            per_record, losses, labelled = self.per_record(x, y, weights)
        else:  # an empty Poisson batch: the noise alone
            per_record = torch.zeros(0, self._width(), device=device)
            losses = torch.zeros(0, k, device=device)
            labelled = torch.zeros(0, k, dtype=torch.bool, device=device)
        released = noisy_mean(
            per_record,
            max_norm=self.max_grad_norm,
            noise_multiplier=self.noise_multiplier,
            expected_batch_size=self.expected_batch_size,
            runtime=self.runtime,
        )
        if self.mode == "aggregation":
            weights = self._aggregate(released)
        else:
            self._write(released, [*self.shared.values(), *self.heads.values(), *self.own.values()])
        counts = labelled.sum(0)
        logged = losses.sum(0) / counts.clamp_min(1)
        return logged, counts > 0, weights

    def _aggregate(self, released: Tensor) -> Tensor:
        """Hand the noisy mean Jacobian to the aggregator (every task is a row: which tasks a
        batch labels is private); the heads get their noisy gradients."""
        assert isinstance(self.balancer, GradientAggregator)
        k = len(self.tasks)
        width = sum(p.numel() for p in self.shared.values())
        jacobian = released[: k * width].view(k, width)
        losses = torch.full((k,), float("nan"), device=released.device)  # never released
        update, weights = self.balancer.aggregate(jacobian, losses, None)
        self._write(update, list(self.shared.values()))
        self._write(released[k * width :], list(self.heads.values()))
        return weights.detach()

    def _width(self) -> int:
        """D, the length of each record's vector."""
        shared = sum(p.numel() for p in self.shared.values())
        heads = sum(p.numel() for p in self.heads.values())
        own = sum(p.numel() for p in self.own.values())
        if self.mode == "aggregation":
            return len(self.tasks) * shared + heads
        return shared + heads + own

    @staticmethod
    def _write(flat: Tensor, params: Sequence[Tensor]) -> None:
        offset = 0
        for p in params:
            chunk = flat[offset : offset + p.numel()].view_as(p).to(p.dtype)
            p.grad = chunk.clone() if p.grad is None else p.grad + chunk
            offset += p.numel()
