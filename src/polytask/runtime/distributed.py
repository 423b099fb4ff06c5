"""Data parallelism through PyTorch's own engine: torchrun + DistributedDataParallel.

``init_distributed`` reads torchrun's ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE`` and starts the
process group (NCCL on GPU, gloo on CPU); with no torchrun variables it returns a single-process
context and starts nothing. Rank 0 alone logs, plots and writes files (``is_main``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from polytask.balancing.reduce import Reducer
from polytask.errors import ConfigError
from polytask.runtime.device import resolve_device


@dataclass
class DistributedContext:
    """Where this process stands: its rank among ``world_size`` processes and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    reducer: Reducer | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every process (any picklable-free JSON-like value)."""
        if not self.enabled:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def launched_rank() -> tuple[int, int, int]:
    """(rank, local rank, world size) that torchrun gave this process; ``(0, 0, 1)`` when it was
    not started by torchrun. The one place that reads torchrun's environment."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return 0, 0, 1
    return int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")), world_size


def is_main_process() -> bool:
    """Whether this process is rank 0 (or the only process)."""
    return launched_rank()[0] == 0


def under_torchrun() -> bool:
    """Whether this process was started by torchrun (or any launcher setting ``WORLD_SIZE``)."""
    return "WORLD_SIZE" in os.environ


def init_distributed(device_spec: str = "auto") -> DistributedContext:
    """The context of this process; starts the process group under torchrun."""
    rank, local_rank, world_size = launched_rank()
    if world_size <= 1:
        return DistributedContext(device=resolve_device(device_spec))
    if device_spec in ("auto", "cuda") and torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    elif device_spec.startswith("cuda"):
        device = resolve_device(device_spec)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    return DistributedContext(
        rank=rank, world_size=world_size, local_rank=local_rank, device=device, reducer=Reducer()
    )


def torchrun_arguments(
    *,
    nproc_per_node: int,
    nnodes: str = "1",
    node_rank: int | None = None,
    master_addr: str | None = None,
    master_port: int | None = None,
    rdzv_endpoint: str | None = None,
    command: Sequence[str],
) -> list[str]:
    """Arguments for ``torch.distributed.run`` (torchrun) running ``python -m polytask command``."""
    if nproc_per_node < 1:
        raise ConfigError(f"--nproc-per-node must be >= 1, found {nproc_per_node}")
    args = [f"--nproc-per-node={nproc_per_node}", f"--nnodes={nnodes}"]
    if node_rank is not None:
        args.append(f"--node-rank={node_rank}")
    if master_addr is not None:
        args.append(f"--master-addr={master_addr}")
    if master_port is not None:
        args.append(f"--master-port={master_port}")
    if rdzv_endpoint is not None:
        args += ["--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}"]
    elif nnodes == "1" and master_port is None:
        args.append("--standalone")
    return [*args, "-m", "polytask", *command]


def launch(arguments: Sequence[str]) -> None:
    """Run torchrun in this process with ``arguments`` (as from ``torchrun_arguments``)."""
    from torch.distributed.run import main as torchrun

    torchrun(list(arguments))


def shutdown_distributed() -> None:
    """Leave the process group cleanly (after a final barrier), if one was started."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
