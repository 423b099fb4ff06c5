"""The runtime of one training process: where it runs and how, in one object.

As in Lightning Fabric, devices, processes and precision live here and a training loop only calls
them: ``setup`` prepares the model and the balancer (DDP wrapping, ``torch.compile``), ``forward``
runs the model, ``autocast`` and ``grad_scale`` carry the precision, ``no_sync``,
``clip_gradients`` and ``optimizer_step`` frame the update, and ``all_sum`` / ``all_mean``,
``barrier`` and ``broadcast`` talk to the other processes (no-ops on one process).

Example:
    >>> import torch
    >>> from polytask.balancing import build_balancer
    >>> from polytask.models import build_model
    >>> from polytask.tasks import TaskSpec
    >>> tasks = [TaskSpec("a", "regression"), TaskSpec("b", "binary")]
    >>> model = build_model(tasks, (3,), encoder_params={"hidden": [8]})
    >>> balancer = build_balancer("equal", tasks)
    >>> runtime = Runtime("cpu")
    >>> runtime.setup(model, balancer)
    >>> with runtime.autocast():
    ...     out = runtime.forward(torch.randn(4, 3))
    >>> sorted(out.outputs), runtime.grad_scale(micro_batches=1), runtime.is_main
    (['a', 'b'], 1.0, True)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from rich.console import Console
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from polytask.balancing import Balancer
from polytask.balancing.reduce import Reducer
from polytask.errors import ConfigError
from polytask.runtime.device import resolve_device
from polytask.runtime.distributed import DistributedContext, init_distributed
from polytask.runtime.precision import Precision


class Runtime:
    """Device, processes and precision of one training process.

    Args:
        device: where a single process runs (``auto``, ``cpu``, ``cuda``, ``cuda:N`` or a
            ``torch.device``); leave it out with ``distributed``, whose device is used.
        precision: ``fp32``, ``bf16`` (autocast) or ``fp16`` (autocast + loss scaling, CUDA).
        compile: ``torch.compile`` the model when the balancer allows it; a compiled forward
            that fails falls back to eager once, with a warning.
        distributed: this process's place among several (see ``Runtime.start``).

    Raises ``ConfigError`` when the device cannot run ``precision`` (fp16 needs CUDA).
    """

    def __init__(
        self,
        device: torch.device | str | None = None,
        *,
        precision: str = "fp32",
        compile: bool = False,
        distributed: DistributedContext | None = None,
    ) -> None:
        if distributed is None:
            where = device if isinstance(device, torch.device) else resolve_device(device or "auto")
            distributed = DistributedContext(device=where)
        elif device is not None:
            raise ValueError("give the device or the distributed context, not both")
        self.dist = distributed
        self.precision = Precision(precision, distributed.device)
        self.compile = compile
        self.console = Console(stderr=True)
        self.module: nn.Module | None = None
        self._compiled: Any = None

    @classmethod
    def start(
        cls, device: str = "auto", *, precision: str = "fp32", compile: bool = False
    ) -> Runtime:
        """The runtime of this process: under torchrun it joins the process group and takes
        ``cuda:LOCAL_RANK`` (see ``init_distributed``); otherwise one process on ``device``."""
        return cls(precision=precision, compile=compile, distributed=init_distributed(device))

    # ------------------------------------------------------------------ where
    @property
    def device(self) -> torch.device:
        return self.dist.device

    @property
    def rank(self) -> int:
        return self.dist.rank

    @property
    def world_size(self) -> int:
        return self.dist.world_size

    @property
    def is_main(self) -> bool:
        """Rank 0 (or the only process): the one that logs, plots and writes files."""
        return self.dist.is_main

    @property
    def reducer(self) -> Reducer | None:
        """Averages over the processes (``None`` on one process)."""
        return self.dist.reducer

    # ------------------------------------------------------------------ model
    def setup(self, model: nn.Module, balancer: Balancer, *, accumulate_steps: int = 1) -> None:
        """Prepare ``model`` and ``balancer`` to train here: check that the balancer can scale the
        gradients it writes when fp16 or ``accumulate_steps`` > 1 needs it, attach it to the
        model, and under DDP give it the reducer, move the model to the device and wrap it in
        ``DistributedDataParallel``; compile the model when asked and possible."""
        if accumulate_steps < 1:
            raise ConfigError(f"accumulate_steps must be >= 1, found {accumulate_steps}")
        scaled = self.precision.scales_loss or accumulate_steps > 1
        if scaled and not balancer.supports_grad_scale:
            raise ConfigError(
                f"{type(balancer).__name__} does not support fp16 loss scaling or gradient "
                "accumulation; use precision bf16/fp32 and accumulate_steps 1"
            )
        balancer.attach(model)
        self.module = model
        if self.dist.enabled:
            balancer.distribute(self.dist.reducer)
            model.to(self.device)
            self.module = DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        self._compiled = self._compile(self.module, balancer) if self.compile else None

    def _compile(self, module: nn.Module, balancer: Balancer) -> Any:
        if balancer.needs_shared_params or balancer.needs_features:
            self._warn(
                f"torch.compile is not used with {type(balancer).__name__}: its per-task "
                "backward (vmap over the autograd graph) does not run through compiled graphs; "
                "training eagerly"
            )
            return None
        return torch.compile(module)

    def forward(self, inputs: Any) -> Any:
        """The model's forward (as ``setup`` prepared it); an unsupported compiled forward falls
        back to eager once, with a warning."""
        if self._compiled is not None:
            try:
                return self._compiled(inputs)
            except Exception as exc:  # torch.compile unsupported here: fall back, once
                self._warn(
                    f"torch.compile failed ({type(exc).__name__}: "
                    f"{' '.join(str(exc).split())[:160]}); training without compilation"
                )
                self._compiled = None
        if self.module is None:
            raise RuntimeError("Runtime.forward before Runtime.setup")
        return self.module(inputs)

    def _warn(self, message: str) -> None:
        self.console.print(f"[yellow]warning:[/] {message}")

    # ------------------------------------------------------------------ precision and update
    def autocast(self) -> AbstractContextManager[Any]:
        """The context for the forward pass and the losses (autocast under bf16/fp16)."""
        return self.precision.autocast()

    def grad_scale(self, micro_batches: int) -> Tensor | float:
        """What the balancer multiplies every gradient of one micro-batch by: the fp16 loss scale
        over ``micro_batches``; the float 1.0 for one fp32/bf16 batch."""
        return self.precision.grad_scale(micro_batches)

    def no_sync(self, skip: bool = True) -> AbstractContextManager[Any]:
        """Under DDP with ``skip``, the context in which backward leaves the gradients
        unsynchronised (every micro-batch but the last, balancers that reduce their own
        gradients); otherwise nothing."""
        if skip and isinstance(self.module, DistributedDataParallel):
            return self.module.no_sync()
        return nullcontext()

    def clip_gradients(
        self,
        optimizer: torch.optim.Optimizer,
        params: Sequence[Tensor],
        max_norm: float | None,
    ) -> None:
        """Unscale the gradients (fp16), then clip the global norm of ``params`` to
        ``max_norm`` (``None``: no clipping)."""
        self.precision.unscale(optimizer)
        if max_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, max_norm)

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Step ``optimizer`` (through the loss scaler under fp16)."""
        self.precision.step(optimizer)

    def state_dict(self) -> dict[str, Any] | None:
        """The loss scaler's state, to checkpoint (``None`` when there is none)."""
        return self.precision.state_dict()

    def load_state_dict(self, state: Mapping[str, Any] | None) -> None:
        self.precision.load_state_dict(state)

    # ------------------------------------------------------------------ other processes
    def all_sum(self, tensor: Tensor) -> Tensor:
        """``tensor`` summed over the processes (itself on one process)."""
        return self.dist.reducer.sum(tensor) if self.dist.reducer is not None else tensor

    def all_mean(self, tensor: Tensor) -> Tensor:
        """``tensor`` averaged over the processes (itself on one process)."""
        return self.dist.reducer.mean(tensor) if self.dist.reducer is not None else tensor

    def barrier(self) -> None:
        """Wait for every process (nothing on one process)."""
        self.dist.barrier()

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every process."""
        return self.dist.broadcast(value)
