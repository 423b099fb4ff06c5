"""Optimizers and the warm-up + cosine learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from polytask.errors import ConfigError


def build_optimizer(
    params: Iterable[nn.Parameter] | Sequence[dict[str, Any]],
    *,
    name: str = "adamw",
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    betas: tuple[float, float] = (0.9, 0.999),
) -> torch.optim.Optimizer:
    """AdamW or SGD (with momentum) over ``params``: parameters (those that require a gradient),
    or parameter groups taken as they are (each group's own ``lr``, e.g. a backbone's)."""
    given: list[Any] = list(params)
    if not given or not isinstance(given[0], dict):
        given = [p for p in given if p.requires_grad]
    if name == "adamw":
        return torch.optim.AdamW(given, lr=lr, weight_decay=weight_decay, betas=betas)
    if name == "sgd":
        return torch.optim.SGD(given, lr=lr, weight_decay=weight_decay, momentum=momentum)
    raise ConfigError(f"optimizer.name: unknown optimizer {name!r}; valid: adamw, sgd")


def warmup_cosine(
    step: int, *, warmup_steps: int, total_steps: int, min_ratio: float = 0.0, cosine: bool = True
) -> float:
    """Learning-rate factor at ``step``: linear warm-up from ~0 to 1 over ``warmup_steps``, then
    a cosine decay to ``min_ratio`` at ``total_steps`` (or constant 1 when ``cosine`` is False).

    Example:
        >>> [round(warmup_cosine(s, warmup_steps=2, total_steps=6), 3) for s in range(7)]
        [0.5, 1.0, 1.0, 0.854, 0.5, 0.146, 0.0]
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if not cosine:
        return 1.0
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    name: str = "cosine",
    warmup_steps: int = 0,
    total_steps: int,
    min_lr_ratio: float = 0.0,
) -> LambdaLR:
    """A per-step ``LambdaLR`` following ``warmup_cosine``."""
    if name not in ("cosine", "constant"):
        raise ConfigError(f"schedule.name: unknown schedule {name!r}; valid: cosine, constant")

    def factor(step: int) -> float:
        return warmup_cosine(
            step,
            warmup_steps=warmup_steps,
            total_steps=total_steps,
            min_ratio=min_lr_ratio,
            cosine=name == "cosine",
        )

    return LambdaLR(optimizer, factor)
