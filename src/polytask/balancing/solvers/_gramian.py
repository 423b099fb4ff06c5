"""The Gramian in and out of the solvers: shape checks, symmetric float64 NumPy copies and
back, and normalisation by the mean squared gradient norm (so every solve is scale-free)."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor


def check_gramian(gramian: Tensor, name: str = "gramian") -> None:
    if gramian.ndim != 2 or gramian.shape[0] != gramian.shape[1]:
        raise ValueError(f"`{name}` should be a square matrix, found shape {tuple(gramian.shape)}")


def to_numpy(gramian: Tensor) -> np.ndarray:
    """The Gramian as a symmetric float64 numpy array, non-finite entries replaced by 0."""
    g = gramian.detach().to("cpu", torch.float64).numpy()
    g = np.nan_to_num(0.5 * (g + g.T), nan=0.0, posinf=0.0, neginf=0.0)
    return g


def to_torch(array: np.ndarray, like: Tensor) -> Tensor:
    dtype = like.dtype if like.is_floating_point() else torch.float32
    return torch.as_tensor(np.ascontiguousarray(array)).to(device=like.device, dtype=dtype)


def normalize_gramian(gramian: Tensor, *, eps: float = 0.0) -> Tensor:
    """``G / mean(diag G)`` (so the mean squared gradient norm is 1); an all-zero Gramian (mean
    diagonal ``<= eps``) comes back as zeros.

    Example:
        >>> normalize_gramian(torch.tensor([[2.0, 1.0], [1.0, 6.0]]))
        tensor([[0.5000, 0.2500],
                [0.2500, 1.5000]])
    """
    check_gramian(gramian)
    scale = gramian.diagonal().mean() if gramian.numel() else gramian.new_zeros(())
    safe = torch.where(scale > eps, scale, torch.ones_like(scale))
    return torch.where(scale > eps, gramian / safe, torch.zeros_like(gramian))


def normalize_numpy(g: np.ndarray) -> np.ndarray:
    scale = float(np.mean(np.diag(g))) if g.size else 0.0
    if not scale > 0.0 or not math.isfinite(scale):
        return np.zeros_like(g)
    return g / scale
