"""Reductions across data-parallel processes, for balancing methods under DDP.

Under ``torchrun`` + DistributedDataParallel each process sees only its shard of the batch. The
Trainer hands every process a *local surrogate* of each task loss, ``N · S_k^r / C_k`` (its local
sum of per-sample losses over the global count of labelled samples, times the world size N), whose
mean over processes is the global loss and whose gradients, averaged by DDP, are the global
gradients. A balancer then needs the mean over processes of two things: the loss values (methods
whose weights depend on them) and, for gradient methods, the per-task Jacobian. A ``Reducer``
provides that mean; ``None`` (one process) means nothing to reduce.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


class Reducer:
    """Averages tensors over the processes of a group (``torch.distributed``)."""

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group
        self.world_size = dist.get_world_size(group)

    def mean(self, tensor: Tensor) -> Tensor:
        """The element-wise mean of ``tensor`` over all processes (a new tensor)."""
        out = tensor.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=self.group)
        return out / self.world_size

    def mean_(self, tensor: Tensor) -> Tensor:
        """In-place element-wise mean over all processes."""
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
        return tensor.div_(self.world_size)

    def sum(self, tensor: Tensor) -> Tensor:
        out = tensor.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=self.group)
        return out

    def any(self, mask: Tensor) -> Tensor:
        """Element-wise logical or of a boolean tensor over all processes."""
        out = mask.to(torch.int32)
        dist.all_reduce(out, op=dist.ReduceOp.MAX, group=self.group)
        return out.bool()
