"""Numeric precision of training: autocast and the fp16 loss scale.

``fp32`` runs as written; ``bf16`` runs the forward under ``torch.autocast`` in bfloat16 (CPU and
CUDA, no scaling needed); ``fp16`` runs it in float16 and scales the gradients with a
``GradScaler`` so that small ones do not underflow (CUDA only).
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import Tensor

from polytask.errors import ConfigError

PRECISIONS = ("fp32", "bf16", "fp16")


class Precision:
    """Autocast and loss scaling for ``precision`` on ``device``.

    Raises ``ConfigError`` for an unknown precision, or fp16 without CUDA.

    Example:
        >>> p = Precision("fp32", torch.device("cpu"))
        >>> p.grad_scale(micro_batches=2)
        0.5
    """

    def __init__(self, precision: str, device: torch.device) -> None:
        if precision not in PRECISIONS:
            raise ConfigError(
                f"precision must be one of {', '.join(PRECISIONS)}, found {precision!r}"
            )
        if precision == "fp16" and device.type != "cuda":
            raise ConfigError("train.precision: fp16 needs CUDA (use bf16 on CPU)")
        self.name = precision
        self.device = device
        self.scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None

    @property
    def scales_loss(self) -> bool:
        """Whether gradients are multiplied by a loss scale (fp16)."""
        return self.scaler is not None

    def autocast(self) -> AbstractContextManager[Any]:
        """The context to run the forward pass (and the losses) in."""
        if self.name == "fp32":
            return nullcontext()
        dtype = torch.float16 if self.name == "fp16" else torch.bfloat16
        return torch.autocast(self.device.type, dtype=dtype)

    def grad_scale(self, micro_batches: int) -> Tensor | float:
        """What every gradient of one micro-batch is multiplied by: the loss scale (fp16, a tensor
        on the device, no host sync) over the number of micro-batches of the step; the float 1.0
        for one fp32/bf16 batch, so that balancers keep their fast path."""
        if self.scaler is None:
            return 1.0 / micro_batches
        return self.scaler.scale(torch.ones((), device=self.device)) / micro_batches

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        """Divide the gradients of ``optimizer``'s parameters by the loss scale (to clip them)."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """Step ``optimizer``; under fp16 skip steps with inf/nan gradients and update the scale."""
        if self.scaler is None:
            optimizer.step()
            return
        self.scaler.step(optimizer)
        self.scaler.update()

    def state_dict(self) -> dict[str, Any] | None:
        """The loss scaler's state (``None`` without one)."""
        return self.scaler.state_dict() if self.scaler is not None else None

    def load_state_dict(self, state: Mapping[str, Any] | None) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(dict(state))
