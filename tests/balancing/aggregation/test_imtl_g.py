"""IMTL-G (Liu et al., ICLR 2021): hand cases, equal projections onto the unit gradients,
agreement with the paper's closed form, degenerate inputs and a training step."""

from __future__ import annotations

import itertools
import math
from typing import Any

import pytest
import torch
from tiny_steps import tiny_steps
from torch import Tensor

from polytask.balancing.aggregation._imtl_g import IMTLG, imtl_g_weights


def _train_step(name: str, **params: Any) -> None:
    """One real step on a tiny model: every parameter gets a finite gradient."""
    tiny_steps(name, **params)


def _paper_formula(j: Tensor) -> Tensor:
    """Eq. (9) of the paper, as LibMTL writes it: α_{2..K} = g_1 Uᵀ (D Uᵀ)⁻¹."""
    units = j / j.norm(dim=1, keepdim=True)
    d = j[0:1] - j[1:]
    u = units[0:1] - units[1:]
    alpha = j[0] @ u.T @ torch.linalg.inv(d @ u.T)
    return torch.cat([1 - alpha.sum(0, keepdim=True), alpha])


def test_hand_cases() -> None:
    # g1 = (1, 0), g2 = (0, 2): n = (1, 2), the cosines are I, so β = n α is uniform:
    # β = (μ, μ), α = (μ, μ/2), Σα = 1 -> μ = 2/3, α = (2/3, 1/3), d = (2/3, 2/3)
    update, weights = IMTLG(["a", "b"]).aggregate(
        torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.ones(2)
    )
    torch.testing.assert_close(weights, torch.tensor([2 / 3, 1 / 3]))
    torch.testing.assert_close(update, torch.tensor([2 / 3, 2 / 3]))
    # g1 = (1, 0), g2 = (1, 1): d = α g1 + (1 - α) g2 = (1, 1 - α);
    # <d, u1> = 1, <d, u2> = (2 - α) / √2; equal -> α = 2 - √2 ≈ 0.586
    _, weights = IMTLG(["a", "b"]).aggregate(torch.tensor([[1.0, 0.0], [1.0, 1.0]]), torch.ones(2))
    a = 2 - math.sqrt(2)
    torch.testing.assert_close(weights, torch.tensor([a, 1 - a]))


@pytest.mark.parametrize(("k", "seed"), list(itertools.product([2, 3, 5, 10, 20], range(4))))
def test_equal_projections_on_unit_gradients(k: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    j = torch.randn(k, 30, generator=gen, dtype=torch.float64)
    j = j * torch.logspace(-2, 2, k, dtype=torch.float64)[:, None]
    if seed % 2:
        j[1] = -0.9 * j[0] + 0.2 * j[1]
    update, weights = IMTLG([str(i) for i in range(k)]).aggregate(j, torch.ones(k))
    assert abs(float(weights.sum()) - 1) < 1e-10
    projections = (j / j.norm(dim=1, keepdim=True)) @ update
    spread = float(projections.max() - projections.min())
    assert spread <= 1e-8 * float(projections.abs().max())
    torch.testing.assert_close(weights, _paper_formula(j), rtol=1e-6, atol=1e-9)


def test_degenerate_inputs() -> None:
    # a zero gradient has no direction: weight 0, the others keep equal projections
    j = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    update, weights = IMTLG(["a", "b", "c"]).aggregate(j, torch.ones(3))
    torch.testing.assert_close(weights, torch.tensor([2 / 3, 0.0, 1 / 3]))
    # identical gradients: the mean
    g = torch.tensor([1.0, -2.0])
    update, weights = IMTLG(["a", "b", "c"]).aggregate(g.repeat(3, 1), torch.ones(3))
    torch.testing.assert_close(weights, torch.full((3,), 1 / 3))
    torch.testing.assert_close(update, g)
    # exactly opposed gradients: the only impartial combination is 0
    update, weights = IMTLG(["a", "b"]).aggregate(
        torch.tensor([[1.0, 1.0], [-1.0, -1.0]]), torch.ones(2)
    )
    torch.testing.assert_close(update, torch.zeros(2))
    torch.testing.assert_close(imtl_g_weights(torch.zeros(2, 2)), torch.full((2,), 0.5))
    torch.testing.assert_close(imtl_g_weights(torch.tensor([[4.0]])), torch.ones(1))


@pytest.mark.parametrize("params", [{}, {"update_every": 2}, {"level": "features"}])
def test_training_step(params: dict[str, Any]) -> None:
    _train_step("imtl_g", **params)
