"""FairGrad (Ban & Ji, ICML 2024): the α-fair equation G·w = w^(-1/α) on hand-worked and random
Gramians, its scaling law, α = 1 as Nash bargaining, clipping, a real training step."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from tiny_steps import tiny_steps
from torch import Tensor

from polytask.balancing import BALANCERS
from polytask.balancing.aggregation._fairgrad import FairGrad
from polytask.balancing.solvers.power_bargaining import solve_power_bargaining
from polytask.errors import ConfigError


def _train_step(name: str, steps: int = 1, **params: Any) -> tuple[Any, torch.nn.Module]:
    """Real steps on a tiny model: every parameter gets a finite gradient."""
    result, model, _ = tiny_steps(name, presents=(None,) * steps, **params)
    return result, model


def _random_gramian(k: int, seed: int) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    scales = 10.0 ** (2 * torch.rand(k, 1, generator=gen, dtype=torch.float64) - 1)
    j = torch.randn(k, 2 * k + 5, generator=gen, dtype=torch.float64) * scales
    return j @ j.T


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0, 5.0])
def test_hand_case_orthogonal_gradients(alpha: float) -> None:
    # Orthogonal gradients with norms a = 2, b = 0.5: G = diag(a², b²), so the equations decouple:
    # a² w1 = w1^(-1/α)  =>  w1^(1 + 1/α) = a^(-2)  =>  w1 = a^(-2α/(α+1)), same for w2 with b.
    # α = 1: w = (1/a, 1/b) = (0.5, 2) (Nash); α = 2: w1 = 2^(-4/3) ≈ 0.3969, w2 = 0.5^(-4/3).
    a, b = 2.0, 0.5
    jacobian = torch.tensor([[a, 0.0], [0.0, b]], dtype=torch.float64)
    _, weights = FairGrad(["x", "y"], alpha=alpha, max_norm=0.0).aggregate(jacobian, torch.ones(2))
    exponent = -2 * alpha / (alpha + 1)
    expected = torch.tensor([a**exponent, b**exponent], dtype=torch.float64)
    torch.testing.assert_close(weights, expected, rtol=1e-7, atol=0.0)


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0, 5.0])
@pytest.mark.parametrize("k", [2, 3, 5, 10, 40])
@pytest.mark.parametrize("seed", range(2))
def test_fair_equation_on_random_full_rank_gramians(alpha: float, k: int, seed: int) -> None:
    g = _random_gramian(k, seed)
    w = FairGrad([f"t{i}" for i in range(k)], alpha=alpha, max_norm=0.0).weights_from_gramian(
        g, g[0]
    )
    assert (w > 0).all()
    target = w ** (-1.0 / alpha)
    # relative residual of G w = w^(-1/α), row by row
    assert float(((g @ w) / target - 1).abs().max()) < 1e-4
    assert float((g @ w - target).abs().max()) < 1e-4 * float(target.abs().max())


@pytest.mark.parametrize("alpha", [0.5, 1.0, 3.0])
def test_scaling_law(alpha: float) -> None:
    # G → s·G: s·c·Gw = (c w)^(-1/α) holds for c^(1 + 1/α) = 1/s, i.e. c = s^(-α/(α+1)).
    g = _random_gramian(4, 11)
    w = solve_power_bargaining(g, 1.0 / alpha)
    for s in (1e-4, 1e3):
        scaled = solve_power_bargaining(s * g, 1.0 / alpha)
        np.testing.assert_allclose(scaled, w * s ** (-alpha / (alpha + 1)), rtol=1e-6)


def test_alpha_one_is_nash_bargaining() -> None:
    # α = 1: G w = 1/w, the Nash-MTL equation (without its normalisation of G)
    g = _random_gramian(5, 2)
    w = FairGrad(list("abcde"), max_norm=0.0).weights_from_gramian(g, g[0])
    assert float((w * (g @ w) - 1).abs().max()) < 1e-6


def test_singular_gramians_stay_finite() -> None:
    gen = torch.Generator().manual_seed(0)
    row = torch.randn(6, generator=gen, dtype=torch.float64)
    for j in (
        torch.stack([row, row, 2 * row]),  # duplicates / parallel
        torch.stack([row, -row]),  # exactly opposed: no finite solution, regularised
        torch.stack([row, torch.zeros(6, dtype=torch.float64)]),  # a zero gradient
    ):
        k = j.shape[0]
        for alpha in (0.5, 1.0, 2.0):
            agg = FairGrad([f"t{i}" for i in range(k)], alpha=alpha, max_norm=0.0)
            update, weights = agg.aggregate(j, torch.ones(k))
            assert torch.isfinite(weights).all() and (weights > 0).all()
            assert torch.isfinite(update).all()


def test_max_norm_clips_the_update() -> None:
    g_j = torch.tensor([[30.0, 0.0], [0.0, 0.02]], dtype=torch.float64)
    free, free_w = FairGrad(["a", "b"], max_norm=0.0).aggregate(g_j, torch.ones(2))
    clipped, w = FairGrad(["a", "b"], max_norm=0.5).aggregate(g_j, torch.ones(2))
    assert float(free.norm()) > 0.5
    torch.testing.assert_close(w, free_w * 0.5 / (float(free.norm()) + 1e-6))
    assert float(clipped.norm()) <= 0.5


def test_training_step() -> None:
    _train_step("fairgrad")
    _train_step("fairgrad", alpha=2.0)
    _, model = _train_step("fairgrad", steps=2, update_every=2, max_norm=0.01)
    shared = torch.cat([p.grad.reshape(-1) for p in model.shared_parameters()])
    assert float(shared.norm()) <= 0.01 + 1e-6  # the reused step is clipped too


def test_registry_and_errors() -> None:
    assert BALANCERS.get("fairgrad") is FairGrad
    assert set(BALANCERS.parameters("fairgrad")) == {"alpha", "max_norm", "update_every", "level"}
    for bad in (0.0, -1.0):
        with pytest.raises(ConfigError, match="alpha"):
            FairGrad(["a"], alpha=bad)
