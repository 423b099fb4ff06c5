"""Tensor helpers of the loss weightings: absent tasks (``present[k]`` false) get exactly 0, a
softmax over the present tasks only, and the epsilon the papers add to losses."""

from __future__ import annotations

import torch
from torch import Tensor

#: added where the papers divide by or take the log of a loss (as LibMTL and the FAMO code do)
EPS = 1e-8


def tiny(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).tiny)


def zero_absent(values: Tensor, present: Tensor) -> Tensor:
    """``values`` on the present tasks, exactly 0 on the absent ones."""
    return torch.where(present, values, torch.zeros_like(values))


def masked_softmax(logits: Tensor, present: Tensor) -> Tensor:
    """Softmax over the present entries of ``logits``; 0 on the absent ones (all 0 when none is
    present). Infinite logits are clamped to the dtype's range, so the result is always finite.

    Example:
        >>> masked_softmax(torch.zeros(3), torch.tensor([True, False, True])).tolist()
        [0.5, 0.0, 0.5]
    """
    info = torch.finfo(logits.dtype)
    logits = torch.nan_to_num(logits, nan=0.0, posinf=info.max, neginf=info.min)
    masked = torch.where(present, logits, torch.full_like(logits, info.min))
    exps = zero_absent(torch.exp(masked - masked.max()), present)
    return exps / exps.sum().clamp_min(info.tiny)
