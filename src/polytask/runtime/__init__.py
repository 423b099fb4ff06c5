"""Where and how this process runs: rank, world and device, the process group, DDP wrapping,
autocast and the loss scale, ``torch.compile``, launching torchrun. ``Runtime`` holds them in one
object; the Trainer asks it, and nothing below it uses it."""

from polytask.runtime.device import resolve_device
from polytask.runtime.distributed import (
    DistributedContext,
    init_distributed,
    is_main_process,
    launch,
    launched_rank,
    shutdown_distributed,
    torchrun_arguments,
    under_torchrun,
)
from polytask.runtime.precision import PRECISIONS, Precision
from polytask.runtime.runtime import Runtime

__all__ = [
    "PRECISIONS",
    "DistributedContext",
    "Precision",
    "Runtime",
    "init_distributed",
    "is_main_process",
    "launch",
    "launched_rank",
    "resolve_device",
    "shutdown_distributed",
    "torchrun_arguments",
    "under_torchrun",
]
