"""Per-task gradients in one batched backward, and their Gramian.

``task_jacobian`` differentiates the K task losses with respect to a set of tensors (the shared
parameters, or the shared features) in ONE backward pass vectorised over the K tasks
(``torch.autograd.grad(..., is_grads_batched=True)``), falling back to K passes only where an
operation has no batching rule.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import Tensor


def task_jacobian(
    losses: Tensor,
    inputs: Sequence[Tensor],
    *,
    retain_graph: bool = False,
    batched: bool = True,
) -> list[Tensor | None]:
    """Gradients of each of the K ``losses`` with respect to each tensor of ``inputs``.

    Returns, per input, a tensor ``[K, *input.shape]`` (``None`` where no loss depends on it).

    Example:
        >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> losses = torch.stack([(w ** 2).sum(), 3 * w[0]])
        >>> task_jacobian(losses, [w])[0]
        tensor([[2., 4.],
                [3., 0.]])
    """
    k = losses.numel()
    eye = torch.eye(k, dtype=losses.dtype, device=losses.device)
    if batched:
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*There is a performance drop.*")
                grads = torch.autograd.grad(
                    losses,
                    list(inputs),
                    grad_outputs=eye,
                    is_grads_batched=True,
                    retain_graph=retain_graph,
                    allow_unused=True,
                )
            return list(grads)
        except RuntimeError as exc:  # an op without a batching rule: loop over tasks instead
            if "vmap" not in str(exc) and "batch" not in str(exc).lower():
                raise
    rows: list[list[Tensor | None]] = []
    for i in range(k):
        rows.append(
            list(
                torch.autograd.grad(
                    losses[i],
                    list(inputs),
                    retain_graph=retain_graph or i < k - 1,
                    allow_unused=True,
                )
            )
        )
    out: list[Tensor | None] = []
    for j, tensor in enumerate(inputs):
        column = [row[j] for row in rows]
        if all(g is None for g in column):
            out.append(None)
        else:
            out.append(
                torch.stack([g if g is not None else torch.zeros_like(tensor) for g in column])
            )
    return out


def flatten_jacobian(blocks: Sequence[Tensor | None], inputs: Sequence[Tensor], k: int) -> Tensor:
    """Concatenate per-input blocks ``[K, *shape]`` into the K×P Jacobian (zeros for ``None``)."""
    parts = []
    for block, tensor in zip(blocks, inputs, strict=True):
        if block is None:
            parts.append(tensor.new_zeros(k, tensor.numel()))
        else:
            parts.append(block.reshape(k, -1))
    return torch.cat(parts, dim=1)


def unscaled_jacobian(
    scaled_losses: Tensor,
    inputs: Sequence[Tensor],
    scale: Tensor | float,
    *,
    dtype: torch.dtype | None = None,
    retain_graph: bool = False,
) -> Tensor:
    """The K×P Jacobian of ``scaled_losses / scale``: the losses are differentiated as given
    (multiplied by the fp16 loss scale, so small gradients do not underflow) and the result is
    divided by ``scale`` in ``dtype`` (default: float32 or wider).

    Example:
        >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> unscaled_jacobian(torch.stack([(w ** 2).sum(), 3 * w[0]]) * 8.0, [w], 8.0)
        tensor([[2., 4.],
                [3., 0.]])
    """
    k = scaled_losses.numel()
    blocks = task_jacobian(scaled_losses, inputs, retain_graph=retain_graph)
    jacobian = flatten_jacobian(blocks, inputs, k)
    if dtype is not None:
        jacobian = jacobian.to(dtype)
    elif jacobian.dtype not in (torch.float32, torch.float64):
        jacobian = jacobian.float()
    if not (isinstance(scale, float) and scale == 1.0):
        jacobian = jacobian / scale
    return jacobian


def gramian(jacobian: Tensor) -> Tensor:
    """``J Jᵀ`` computed in float32 or wider (the Gramian of the task gradients)."""
    j = jacobian if jacobian.dtype in (torch.float32, torch.float64) else jacobian.float()
    return j @ j.T
