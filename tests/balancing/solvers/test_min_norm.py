"""``min_norm_simplex`` (MGDA's problem): hand cases, KKT conditions on random and degenerate
Gramians, a grid search, scale invariance."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from tiny_steps import SOLVER_CASES, solver_jacobian

from polytask.balancing.solvers import (
    min_norm_simplex,
)


def test_min_norm_simplex_two_tasks_by_hand() -> None:
    # g1 = (1, 0), g2 = (0, 2): w1 = ((g2-g1)·g2) / ||g1-g2||² = ((-1)(0) + (2)(2)) / (1 + 4) = 0.8
    g = torch.tensor([[1.0, 0.0], [0.0, 4.0]])
    torch.testing.assert_close(min_norm_simplex(g), torch.tensor([0.8, 0.2]))
    # g1 = (1, 0), g2 = (3, 0): ((2)(3)) / 4 = 1.5 -> clipped to 1 (g1 is the min-norm point)
    g = torch.tensor([[1.0, 3.0], [3.0, 9.0]])
    torch.testing.assert_close(min_norm_simplex(g), torch.tensor([1.0, 0.0]))


@pytest.mark.parametrize(("kind", "k", "seed"), SOLVER_CASES)
def test_min_norm_simplex_satisfies_kkt(kind: str, k: int, seed: int) -> None:
    j = solver_jacobian(kind, k, 50, seed)
    g = j @ j.T
    w = min_norm_simplex(g)
    assert w.dtype == g.dtype and w.shape == (k,)
    assert (w >= 0).all() and abs(float(w.sum()) - 1.0) < 1e-12
    gw = g @ w
    q = w @ gw
    tol = 1e-8 * float(g.diagonal().mean())
    # (Gw)_i >= wᵀGw for every i, with equality where w_i > 0
    assert float((q - gw).max()) <= tol
    assert float(((w > 1e-9) * (gw - q).abs()).max()) <= tol


def test_min_norm_simplex_matches_a_grid_search_for_three_tasks() -> None:
    j = torch.tensor([[1.0, 0.2], [-0.5, 1.0], [0.3, -1.0]], dtype=torch.float64)
    g = j @ j.T
    w = min_norm_simplex(g)
    steps = 200
    best = math.inf
    for a, b in itertools.product(range(steps + 1), repeat=2):
        if a + b <= steps:
            v = torch.tensor([a, b, steps - a - b], dtype=torch.float64) / steps
            best = min(best, float(v @ g @ v))
    assert float(w @ g @ w) <= best + 1e-12


@pytest.mark.parametrize("scale", [1e-8, 1e-3, 1.0, 1e4, 1e8])
def test_min_norm_simplex_is_scale_free(scale: float) -> None:
    j = solver_jacobian("random", 6, 10, 3)
    g = j @ j.T
    torch.testing.assert_close(min_norm_simplex(scale * g), min_norm_simplex(g))


def test_min_norm_simplex_degenerate_inputs() -> None:
    torch.testing.assert_close(min_norm_simplex(torch.zeros(3, 3)), torch.full((3,), 1 / 3))
    torch.testing.assert_close(min_norm_simplex(torch.ones(1, 1)), torch.ones(1))
    # a zero gradient is the min-norm point
    j = torch.tensor([[1.0, 2.0], [0.0, 0.0], [3.0, -1.0]])
    torch.testing.assert_close(min_norm_simplex(j @ j.T), torch.tensor([0.0, 1.0, 0.0]))
    with pytest.raises(ValueError, match="square"):
        min_norm_simplex(torch.zeros(2, 3))
