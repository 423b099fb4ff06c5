"""CAGrad (Liu et al., NeurIPS 2021): hand cases, the dual objective against a brute-force grid,
the worst-case improvement against sampled points of the ball, options and a training step."""

from __future__ import annotations

import itertools
import math
from typing import Any

import pytest
import torch
from guarantees import _cagrad_value
from tiny_steps import tiny_steps
from torch import Tensor

from polytask.balancing.aggregation._cagrad import CAGrad
from polytask.errors import ConfigError


def _train_step(name: str, **params: Any) -> None:
    """One real step on a tiny model: every parameter gets a finite gradient."""
    tiny_steps(name, **params)


def _jacobian(k: int, p: int, seed: int) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    j = torch.randn(k, p, generator=gen, dtype=torch.float64)
    if seed % 2:
        j[1] = -0.8 * j[0] + 0.3 * j[1]  # a strong conflict
    return j


def _dual_objective(w: Tensor, g: Tensor, c: float) -> Tensor:
    """g_wᵀ g0 + c ||g0|| ||g_w|| for each row w of ``w`` ([N, K])."""
    k = g.shape[0]
    g0_norm = math.sqrt(float(g.mean()))
    linear = w @ g @ torch.full((k,), 1 / k, dtype=g.dtype)
    return linear + c * g0_norm * ((w @ g) * w).sum(1).clamp_min(0).sqrt()


def _simplex_grid(k: int, steps: int) -> Tensor:
    axes = torch.arange(steps + 1, dtype=torch.float64)
    if k == 2:
        points = torch.stack([axes, steps - axes], 1)
    else:
        a, b = torch.meshgrid(axes, axes, indexing="ij")
        keep = a + b <= steps
        points = torch.stack([a[keep], b[keep], steps - a[keep] - b[keep]], 1)
    return points / steps


def test_hand_cases() -> None:
    # orthogonal unit gradients: by symmetry w = (1/2, 1/2), g_w = g0 = (0.5, 0.5),
    # ||g0|| = 1/√2; d = g0 + c ||g0|| g_w / ||g_w|| = (1 + c) g0 = 1.5 (0.5, 0.5) for c = 0.5
    j = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    update, weights = CAGrad(["a", "b"], c=0.5, rescale=0).aggregate(j, torch.ones(2))
    torch.testing.assert_close(update, torch.tensor([0.75, 0.75]))
    torch.testing.assert_close(weights, torch.tensor([0.75, 0.75]))
    # rescale = 1 divides by 1 + c² = 1.25: (0.6, 0.6); rescale = 2 by 1 + c = 1.5: (0.5, 0.5)
    update, _ = CAGrad(["a", "b"], c=0.5, rescale=1).aggregate(j, torch.ones(2))
    torch.testing.assert_close(update, torch.tensor([0.6, 0.6]))
    update, _ = CAGrad(["a", "b"], c=0.5, rescale=2).aggregate(j, torch.ones(2))
    torch.testing.assert_close(update, torch.tensor([0.5, 0.5]))
    # one task g = (3, 4): d = g + 0.4 · 5 · g / 5 = 1.4 g, rescaled by 1 / 1.16
    update, weights = CAGrad(["a"]).aggregate(torch.tensor([[3.0, 4.0]]), torch.ones(1))
    torch.testing.assert_close(weights, torch.tensor([1.4 / 1.16]))
    # c = 0: the mean gradient
    j = torch.tensor([[1.0, 0.0], [-3.0, 2.0]])
    update, _ = CAGrad(["a", "b"], c=0.0).aggregate(j, torch.ones(2))
    torch.testing.assert_close(update, torch.tensor([-1.0, 1.0]))


@pytest.mark.parametrize(("k", "seed"), list(itertools.product([2, 3], range(4))))
def test_dual_objective_beats_a_brute_force_grid(k: int, seed: int) -> None:
    c = 0.4
    j = _jacobian(k, 6, seed)
    g = j @ j.T
    _, weights = CAGrad([str(i) for i in range(k)], c=c, rescale=0).aggregate(j, torch.ones(k))
    # weights = 1/K + λ w with w on the simplex: recover w
    lam_w = weights - 1 / k
    w = lam_w / lam_w.sum() if float(lam_w.sum()) > 1e-12 else torch.full((k,), 1 / k)
    mine = float(_dual_objective(w.to(torch.float64)[None], g, c)[0])
    best = float(_dual_objective(_simplex_grid(k, 20000 if k == 2 else 400), g, c).min())
    assert mine <= best + 1e-10 * float(g.diagonal().mean())


@pytest.mark.parametrize(("k", "seed"), list(itertools.product([2, 3, 5, 10], range(3))))
def test_update_maximises_the_worst_improvement_over_the_ball(k: int, seed: int) -> None:
    c = 0.5
    j = _jacobian(k, 12, seed)
    update, _ = CAGrad([str(i) for i in range(k)], c=c, rescale=0).aggregate(j, torch.ones(k))
    g0 = j.mean(0)
    radius = c * float(g0.norm())
    assert abs(float((update - g0).norm()) - radius) <= 1e-9 * radius  # on the boundary
    mine = float((j @ update).min())
    gen = torch.Generator().manual_seed(100 + seed)
    directions = torch.randn(20000, 12, generator=gen, dtype=torch.float64)
    candidates = g0 + radius * directions / directions.norm(dim=1, keepdim=True)
    others = (candidates @ j.T).min(dim=1).values
    assert float(others.max()) <= mine + 1e-9 * float(j.norm()) ** 2


def test_agreeing_tasks_and_errors() -> None:
    g = torch.tensor([1.0, -2.0, 2.0])
    update, _ = CAGrad(["a", "b", "c"], c=0.4).aggregate(g.repeat(3, 1), torch.ones(3))
    torch.testing.assert_close(update, g * 1.4 / 1.16)  # (1 + c) g / (1 + c²)
    with pytest.raises(ConfigError, match="c must"):
        CAGrad(["a"], c=-0.1)
    with pytest.raises(ConfigError, match="rescale"):
        CAGrad(["a"], rescale=3)


def test_zero_gradient_stays_finite() -> None:
    j = torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 0.0], [2.0, 1.0, 1.0]])
    update, weights = CAGrad(["a", "b", "c"]).aggregate(j, torch.ones(3))
    assert torch.isfinite(update).all() and torch.isfinite(weights).all()
    # the zero gradient's improvement is 0 whatever d; the others are served as without it:
    # min_i <g_i, d'> is the exact optimum (d' = (1 + c²) d, in the ball around g0)
    d = update.double() * 1.16
    g0 = j.double().mean(0)
    assert float((d - g0).norm()) <= 0.4 * float(g0.norm()) * (1 + 1e-12)
    exact = _cagrad_value(j.double().numpy(), 0.4)
    assert float((j.double() @ d).min()) == pytest.approx(exact, abs=1e-6)


@pytest.mark.parametrize("order", [1.0, -1.0])
def test_norms_spanning_eight_orders_get_the_constrained_optimum(order: float) -> None:
    # before: the floor on ||g_w|| (1e-6 · rms norm) made this the plain mean (weights 1/K)
    gen = torch.Generator().manual_seed(3)
    j = torch.randn(4, 20, generator=gen, dtype=torch.float64)
    j = j / j.norm(dim=1, keepdim=True) * torch.logspace(-4 * order, 4 * order, 4)[:, None]
    update, weights = CAGrad(list("abcd")).aggregate(j, torch.ones(4))
    assert not torch.allclose(weights * 1.16, torch.full((4,), 0.25, dtype=torch.float64))
    exact = _cagrad_value(j.numpy(), 0.4)
    got = float((j @ (update * 1.16)).min())
    assert got == pytest.approx(exact, rel=1e-9)


@pytest.mark.parametrize("params", [{}, {"c": 0.8, "rescale": 0}, {"update_every": 3}])
def test_training_step(params: dict[str, Any]) -> None:
    _train_step("cagrad", **params)
