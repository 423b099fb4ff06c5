"""MGDA and MGDA-UB (Sener & Koltun, NeurIPS 2018): hand cases, the min-norm (KKT) property,
a brute-force grid, the gradient normalisations, checkpoints and a real training step."""

from __future__ import annotations

import itertools
import math
from typing import Any

import pytest
import torch
from tiny_steps import tiny_steps
from torch import Tensor

from polytask.balancing import BALANCERS
from polytask.balancing.aggregation._mgda import MGDA, MGDAUB, gradient_normalizers
from polytask.errors import ConfigError

ONES2 = torch.ones(2)


def _train_step(name: str, **params: Any) -> None:
    """One real step on a tiny model: every parameter gets a finite gradient."""
    tiny_steps(name, **params)


def test_hand_case_two_tasks() -> None:
    # g1 = (1, 0), g2 = (0, 2): w1 = ((g2 - g1)·g2) / ||g1 - g2||² = (0 + 4) / (1 + 4) = 0.8,
    # d = 0.8 (1, 0) + 0.2 (0, 2) = (0.8, 0.4); <g1, d> = 0.8 = <g2, d> = ||d||² = 0.8
    update, weights = MGDA(["a", "b"]).aggregate(torch.tensor([[1.0, 0.0], [0.0, 2.0]]), ONES2)
    torch.testing.assert_close(weights, torch.tensor([0.8, 0.2]))
    torch.testing.assert_close(update, torch.tensor([0.8, 0.4]))
    # g1 = (1, 0), g2 = (3, 0): (2·3) / 2² = 1.5 -> clip to 1: d = g1
    update, weights = MGDA(["a", "b"]).aggregate(torch.tensor([[1.0, 0.0], [3.0, 0.0]]), ONES2)
    torch.testing.assert_close(weights, torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(update, torch.tensor([1.0, 0.0]))


def _random_jacobian(k: int, p: int, seed: int) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    j = torch.randn(k, p, generator=gen, dtype=torch.float64)
    if seed % 3 == 1:  # strongly conflicting pair
        j[1] = -0.9 * j[0] + 0.1 * j[1]
    if seed % 3 == 2:  # wildly different norms
        j = j * torch.logspace(-3, 3, k, dtype=torch.float64)[:, None]
    return j


@pytest.mark.parametrize(("k", "seed"), list(itertools.product([2, 3, 6, 12], range(6))))
def test_update_is_the_min_norm_point_of_the_hull(k: int, seed: int) -> None:
    j = _random_jacobian(k, 20, seed)
    update, weights = MGDA([str(i) for i in range(k)]).aggregate(j, torch.ones(k))
    assert (weights >= 0).all() and abs(float(weights.sum()) - 1) < 1e-9
    inner = j @ update
    sq = float(update @ update)
    tol = 1e-8 * float((j * j).sum(1).mean())
    # KKT of min ||d||² over the hull: <g_i, d> >= ||d||² for every i, equality where w_i > 0
    assert float(inner.min()) >= sq - tol
    assert float(((weights > 1e-9) * (inner - sq).abs()).max()) <= tol


@pytest.mark.parametrize("seed", range(3))
def test_matches_a_brute_force_grid_for_three_tasks(seed: int) -> None:
    j = _random_jacobian(3, 3, seed)
    update, _ = MGDA(["a", "b", "c"]).aggregate(j, torch.ones(3))
    g = j @ j.T
    steps = 150
    best = math.inf
    for a, b in itertools.product(range(steps + 1), repeat=2):
        if a + b <= steps:
            w = torch.tensor([a, b, steps - a - b], dtype=torch.float64) / steps
            best = min(best, float(w @ g @ w))
    assert float(update @ update) <= best + 1e-12


def test_normalizations() -> None:
    j = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    losses = torch.tensor([0.5, 2.0])
    # l2: unit gradients u1 = (1, 0), u2 = (0, 1) -> w = (1/2, 1/2); weights of the raw rows
    # are w_i / ||g_i|| = (0.5, 0.25) and d = (0.5, 0.5)
    update, weights = MGDA(["a", "b"], normalization="l2").aggregate(j, losses)
    torch.testing.assert_close(weights, torch.tensor([0.5, 0.25]))
    torch.testing.assert_close(update, torch.tensor([0.5, 0.5]))
    # loss: g̃ = (2, 0), (0, 1): w1 = 1 / (4 + 1) = 0.2, weights (0.2 / 0.5, 0.8 / 2) = (0.4, 0.4)
    update, weights = MGDA(["a", "b"], normalization="loss").aggregate(j, losses)
    torch.testing.assert_close(weights, torch.tensor([0.4, 0.4]))
    # loss+: divisors L_i ||g_i|| = (0.5, 4): g̃ = (2, 0), (0, 0.5): w1 = 0.25 / 4.25
    update, weights = MGDA(["a", "b"], normalization="loss+").aggregate(j, losses)
    w1 = 0.25 / 4.25
    torch.testing.assert_close(weights, torch.tensor([w1 / 0.5, (1 - w1) / 4.0]))
    torch.testing.assert_close(gradient_normalizers(j @ j.T, losses, "none"), torch.ones(2))
    with pytest.raises(ConfigError, match="normalization"):
        MGDA(["a"], normalization="L2")


def test_zero_gradient_gives_zero_update() -> None:
    j = torch.tensor([[1.0, 2.0], [0.0, 0.0], [-3.0, 1.0]])
    for normalization in ("none", "l2", "loss", "loss+"):
        update, weights = MGDA(["a", "b", "c"], normalization=normalization).aggregate(
            j, torch.ones(3)
        )
        assert torch.isfinite(weights).all()
        torch.testing.assert_close(update, torch.zeros(2))


def test_single_task_and_registry() -> None:
    update, weights = MGDA(["a"]).aggregate(torch.tensor([[3.0, 4.0]]), torch.ones(1))
    torch.testing.assert_close(weights, torch.ones(1))
    torch.testing.assert_close(update, torch.tensor([3.0, 4.0]))
    assert BALANCERS.get("mgda") is MGDA
    assert BALANCERS.get("mgda_ub") is MGDAUB
    assert MGDAUB(["a", "b"]).level == "features"
    assert MGDAUB(["a", "b"]).needs_features
    assert BALANCERS.parameters("mgda_ub")["level"].default == "features"


def test_state_dict_round_trip_and_update_every() -> None:
    a = MGDA(["a", "b"], update_every=2)
    a.last_weights.copy_(torch.tensor([0.3, 0.7]))
    a.steps.fill_(5)
    b = MGDA(["a", "b"], update_every=2)
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(b.last_weights, torch.tensor([0.3, 0.7]))
    assert int(b.steps) == 5


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("mgda", {}),
        ("mgda", {"normalization": "loss+"}),
        ("mgda", {"update_every": 2}),
        ("mgda_ub", {}),
        ("mgda_ub", {"normalization": "l2"}),
    ],
)
def test_training_step(name: str, params: dict[str, Any]) -> None:
    _train_step(name, **params)
