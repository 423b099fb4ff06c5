"""Aligned-MTL (Senushkin et al., CVPR 2023): the aligned gradients have condition number one,
hand-worked cases, the scale modes, rank-deficient and zero Gramians, a real training step."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from tiny_steps import tiny_steps
from torch import Tensor

from polytask.balancing import BALANCERS
from polytask.balancing.aggregation._aligned_mtl import AlignedMTL, aligned_mtl_matrix
from polytask.errors import ConfigError


def _train_step(name: str, **params: Any) -> None:
    """One real step on a tiny model: every parameter gets a finite gradient."""
    tiny_steps(name, **params)


def _jacobian(kind: str, k: int, seed: int) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    j = torch.randn(k, 30, generator=gen, dtype=torch.float64)
    j = j * 10.0 ** (2 * torch.rand(k, 1, generator=gen, dtype=torch.float64) - 1)
    if kind == "low_rank":  # K rows in a subspace of dimension min(3, K - 1)
        r = min(3, k - 1)
        j = torch.randn(k, r, generator=gen, dtype=torch.float64) @ j[:r]
    if kind == "duplicates":
        j[1] = j[0]
    return j


def test_hand_case_orthogonal_norms_one_and_two() -> None:
    # g1 = (1, 0), g2 = (0, 2): G = diag(1, 4), V = I, λ = (1, 4), λ_min = 1.
    # B = √λ_min · V Λ^{-1/2} Vᵀ = diag(1/1, 1/2) = diag(1, 0.5).
    # Aligned gradients: ĝ1 = 1·g1 = (1, 0), ĝ2 = 0.5·g2 = (0, 1): both of norm σ = 1.
    # Update = ĝ1 + ĝ2 = (1, 1); weights = B·1 = (1, 0.5).
    j = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    b = aligned_mtl_matrix(j @ j.T)
    torch.testing.assert_close(b, torch.diag(torch.tensor([1.0, 0.5], dtype=torch.float64)))
    update, weights = AlignedMTL(["a", "b"]).aggregate(j, torch.ones(2))
    torch.testing.assert_close(weights, torch.tensor([1.0, 0.5], dtype=torch.float64))
    torch.testing.assert_close(update, torch.tensor([1.0, 1.0], dtype=torch.float64))
    # scale_mode="rmse": σ² = mean(1, 4) = 2.5, B = √2.5 · diag(1, 1/2)
    _, weights = AlignedMTL(["a", "b"], scale_mode="rmse").aggregate(j, torch.ones(2))
    torch.testing.assert_close(weights, 2.5**0.5 * torch.tensor([1.0, 0.5], dtype=torch.float64))


def test_hand_case_parallel_gradients() -> None:
    # g1 = (3, 4), g2 = (6, 8) = 2 g1: G = 25·[[1, 2], [2, 4]], rank 1, λ = 125, v = (1, 2)/√5.
    # B = √125 · v vᵀ / √125 = v vᵀ = [[1, 2], [2, 4]] / 5; weights = B·1 = (3/5, 6/5).
    # Update = 0.6 g1 + 1.2 g2 = 3 g1 = (9, 12).
    j = torch.tensor([[3.0, 4.0], [6.0, 8.0]], dtype=torch.float64)
    update, weights = AlignedMTL(["a", "b"]).aggregate(j, torch.ones(2))
    torch.testing.assert_close(weights, torch.tensor([0.6, 1.2], dtype=torch.float64))
    torch.testing.assert_close(update, torch.tensor([9.0, 12.0], dtype=torch.float64))


@pytest.mark.parametrize("kind", ["full_rank", "low_rank", "duplicates"])
@pytest.mark.parametrize("k", [2, 3, 5, 12])
@pytest.mark.parametrize("scale_mode", ["min", "median", "rmse"])
def test_aligned_gramian_has_condition_number_one(kind: str, k: int, scale_mode: str) -> None:
    j = _jacobian(kind, k, seed=k)
    g = j @ j.T
    b = aligned_mtl_matrix(g, scale_mode)  # type: ignore[arg-type]
    aligned = b @ j  # row i: ĝ_i = Σ_j B_ij g_j (B is symmetric)
    eig = torch.linalg.eigvalsh(aligned @ aligned.T)
    kept = torch.linalg.eigvalsh(g)
    kept = kept[kept > kept.max() * k * torch.finfo(torch.float64).eps]
    sigma2 = {
        "min": kept.min(),
        "median": kept.sort().values[(kept.numel() - 1) // 2],
        "rmse": kept.mean(),
    }[scale_mode]
    nonzero = eig[eig > 1e-6 * float(sigma2)]
    # every non-zero eigenvalue of the aligned Gramian B G B equals σ², as many as rank(G)
    assert nonzero.numel() == kept.numel()
    torch.testing.assert_close(nonzero, torch.full_like(nonzero, float(sigma2)), rtol=1e-6, atol=0)


def test_agreeing_tasks_give_the_sum() -> None:
    # G = ‖g‖² 11ᵀ: B = 11ᵀ/K, weights = 1: the update is K·g
    g = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    update, weights = AlignedMTL(list("abcd")).aggregate(g.repeat(4, 1), torch.ones(4))
    torch.testing.assert_close(weights, torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close(update, 4 * g)


def test_zero_gramian_and_one_task() -> None:
    update, weights = AlignedMTL(["a", "b"]).aggregate(torch.zeros(2, 4), torch.ones(2))
    assert torch.equal(update, torch.zeros(4)) and torch.equal(weights, torch.zeros(2))
    g = torch.tensor([[0.3, -0.4]])  # K = 1: B = √λ λ^{-1/2} = 1, the gradient itself
    update, weights = AlignedMTL(["a"]).aggregate(g, torch.ones(1))
    torch.testing.assert_close(weights, torch.ones(1))
    torch.testing.assert_close(update, g[0])


def test_training_step() -> None:
    _train_step("aligned_mtl")
    _train_step("aligned_mtl", scale_mode="median", update_every=2)


def test_registry_and_errors() -> None:
    assert BALANCERS.get("aligned_mtl") is AlignedMTL
    assert set(BALANCERS.parameters("aligned_mtl")) == {"scale_mode", "update_every", "level"}
    with pytest.raises(ConfigError, match="scale_mode"):
        AlignedMTL(["a"], scale_mode="max")  # type: ignore[arg-type]
