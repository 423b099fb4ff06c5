"""Nash-MTL (Navon et al., ICML 2022): the bargaining equation α ⊙ (Gα) = 1 on the raw Gramian,
hand-worked and random, the scale of the weights, update clipping, singular Gramians, a real
training step."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from tiny_steps import tiny_steps
from torch import Tensor

from polytask.balancing import BALANCERS
from polytask.balancing.aggregation._nash_mtl import NashMTL
from polytask.balancing.solvers.power_bargaining import solve_power_bargaining
from polytask.errors import ConfigError
from polytask.tasks import TaskSpec


def _tasks() -> list[TaskSpec]:
    return [
        TaskSpec("r", "regression"),
        TaskSpec("b", "binary"),
        TaskSpec("c", "multiclass", num_classes=3),
    ]


def _train_step(name: str, steps: int = 1, **params: Any) -> tuple[Any, torch.nn.Module]:
    """Real steps on a tiny model: every parameter gets a finite gradient."""
    result, model, _ = tiny_steps(name, presents=(None,) * steps, **params)
    return result, model


def _random_jacobian(k: int, p: int, seed: int, spread: float = 1.0) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    scales = 10.0 ** (spread * (2 * torch.rand(k, 1, generator=gen, dtype=torch.float64) - 1))
    return torch.randn(k, p, generator=gen, dtype=torch.float64) * scales


def test_hand_case_orthogonal_gradients() -> None:
    # Orthogonal g1, g2 with norms a = 3, b = 4: G = diag(a², b²) = diag(9, 16).
    # Try α = (1/a, 1/b): Gα = (a²/a, b²/b) = (a, b) = (3, 4) and 1/α = (a, b) = (3, 4). ✓
    raw = solve_power_bargaining(np.diag([9.0, 16.0]), 1.0)
    np.testing.assert_allclose(raw, [1 / 3, 1 / 4], rtol=1e-12)
    # The class reports that solution (the equation on the raw G, as the authors' constraint):
    jacobian = torch.tensor([[3.0, 0.0], [0.0, 4.0]], dtype=torch.float64)
    update, weights = NashMTL(["a", "b"], max_norm=0.0).aggregate(jacobian, torch.ones(2))
    torch.testing.assert_close(weights, torch.tensor([1 / 3, 1 / 4], dtype=torch.float64))
    # update = α1 g1 + α2 g2 = (1, 1): norm √K = √2
    torch.testing.assert_close(update, torch.ones(2, dtype=torch.float64))


@pytest.mark.parametrize("k", [2, 3, 5, 10, 20, 40])
@pytest.mark.parametrize("seed", range(3))
def test_bargaining_equation_on_random_full_rank_gramians(k: int, seed: int) -> None:
    j = _random_jacobian(k, 2 * k + 5, seed)
    g = j @ j.T
    alpha = torch.from_numpy(solve_power_bargaining(g, 1.0, max_iter=20))
    assert (alpha > 0).all()
    assert float((alpha * (g @ alpha) - 1).abs().max()) < 1e-10
    # the class: α solves the equation for the raw G (not G / ‖G‖_F)
    weights = NashMTL([f"t{i}" for i in range(k)], max_norm=0.0).weights_from_gramian(g, g[0])
    assert float((weights * (g @ weights) - 1).abs().max()) < 1e-10
    assert float(weights @ g @ weights) == pytest.approx(k, rel=1e-10)  # ‖αᵀJ‖² = K


@pytest.mark.parametrize("scale", [1e-6, 1e-2, 1e3, 1e6])
def test_weights_scale_like_one_over_the_gradients(scale: float) -> None:
    # The solution for s·G is α/√s: the weights scale like 1/‖g‖ and the update (norm √K) does
    # not depend on the scale of the gradients, so max_norm clips at the same point.
    j = _random_jacobian(4, 12, 7)
    agg = NashMTL(["a", "b", "c", "d"], max_norm=0.0)
    update, weights = agg.aggregate(j, torch.ones(4))
    scaled_update, scaled_weights = agg.aggregate(scale * j, torch.ones(4))
    torch.testing.assert_close(scaled_weights, weights / scale, rtol=1e-9, atol=0.0)
    torch.testing.assert_close(scaled_update, update, rtol=1e-9, atol=1e-12)
    assert float(update.norm()) == pytest.approx(2.0, rel=1e-10)  # √K


def test_max_norm_clips_the_update() -> None:
    j = _random_jacobian(3, 10, 1) * 10
    free_update, free_weights = NashMTL(["a", "b", "c"], max_norm=0.0).aggregate(j, torch.ones(3))
    assert float(free_update.norm()) > 1.0
    update, weights = NashMTL(["a", "b", "c"]).aggregate(j, torch.ones(3))  # max_norm = 1
    # as clip_grad_norm_: factor max_norm / (norm + 1e-6)
    factor = 1.0 / (float(free_update.norm()) + 1e-6)
    torch.testing.assert_close(weights, free_weights * factor)
    assert float(update.norm()) <= 1.0
    small = j / 1e3  # an update already shorter than max_norm is left alone
    update_small, _ = NashMTL(["a", "b", "c"], max_norm=1e3).aggregate(small, torch.ones(3))
    free_small, _ = NashMTL(["a", "b", "c"], max_norm=0.0).aggregate(small, torch.ones(3))
    torch.testing.assert_close(update_small, free_small)


def test_duplicate_rows_share_the_weight() -> None:
    # g1 = g2 = g: α1 ‖g‖² (α1 + α2) = 1 = α2 ‖g‖² (α1 + α2)  =>  α1 = α2 = 1 / (√2 ‖g‖).
    g = torch.tensor([[3.0, 4.0], [3.0, 4.0]], dtype=torch.float64)  # ‖g‖ = 5
    raw = solve_power_bargaining(g @ g.T, 1.0)
    np.testing.assert_allclose(raw, [1 / (2**0.5 * 5)] * 2, rtol=1e-6)


def test_zero_row_and_opposed_rows_stay_finite() -> None:
    j = _random_jacobian(3, 8, 3)
    zero = j.clone()
    zero[1] = 0.0
    raw = solve_power_bargaining(zero @ zero.T, 1.0)
    others = solve_power_bargaining(j[[0, 2]] @ j[[0, 2]].T, 1.0)
    # the others bargain without task 1; task 1 gets the largest of their weights
    np.testing.assert_allclose(raw[[0, 2]], others, rtol=1e-6)
    assert raw[1] == pytest.approx(others.max())
    opposed = torch.stack([j[0], -2.0 * j[0]])  # no finite solution: regularised
    update, weights = NashMTL(["a", "b"], max_norm=0.0).aggregate(opposed, torch.ones(2))
    assert torch.isfinite(weights).all() and (weights > 0).all() and torch.isfinite(update).all()
    nearly = torch.stack([j[0], -2.0 * j[0] + 0.01 * j[1]])  # near-opposite: solved exactly
    _, weights = NashMTL(["a", "b"], max_norm=0.0).aggregate(nearly, torch.ones(2))
    g = nearly @ nearly.T
    assert float((weights * (g @ weights) - 1).abs().max()) < 1e-10
    all_zero = torch.zeros(2, 5)
    update, weights = NashMTL(["a", "b"]).aggregate(all_zero, torch.ones(2))
    assert torch.equal(update, torch.zeros(5)) and torch.isfinite(weights).all()


def test_one_task() -> None:
    # K = 1: α ‖g‖² α = 1, α = 1/‖g‖ = 2: the update is the unit gradient (before clipping)
    g = torch.tensor([[0.3, -0.4]])
    update, weights = NashMTL(["a"], max_norm=0.0).aggregate(g, torch.ones(1))
    torch.testing.assert_close(weights, torch.full((1,), 2.0))
    torch.testing.assert_close(update, g[0] / 0.5)


def test_training_step() -> None:
    _train_step("nash_mtl")


def test_update_every_reuses_weights_and_clips_the_reused_steps() -> None:
    _, model = _train_step("nash_mtl", steps=3, update_every=2, max_norm=0.01)
    shared = torch.cat([p.grad.reshape(-1) for p in model.shared_parameters()])
    assert float(shared.norm()) <= 0.01 + 1e-6  # step 3 (index 2) recomputed and clipped
    _, model = _train_step("nash_mtl", steps=2, update_every=2, max_norm=0.01)
    shared = torch.cat([p.grad.reshape(-1) for p in model.shared_parameters()])
    assert float(shared.norm()) <= 0.01 + 1e-6  # step 2 reused the weights, then clipped


def test_registry_and_errors() -> None:
    assert BALANCERS.get("nash_mtl") is NashMTL
    assert set(BALANCERS.parameters("nash_mtl")) == {
        "update_every",
        "max_norm",
        "optim_niter",
        "level",
    }
    with pytest.raises(ConfigError, match="optim_niter"):
        NashMTL(["a"], optim_niter=0)
