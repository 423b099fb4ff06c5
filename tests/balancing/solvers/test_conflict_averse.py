"""``conflict_averse_simplex`` (CAGrad's dual) against random simplex points, and
``normalize_gramian``."""

from __future__ import annotations

import pytest
import torch
from tiny_steps import solver_jacobian
from torch import Tensor

from polytask.balancing.solvers import (
    conflict_averse_simplex,
    normalize_gramian,
)


@pytest.mark.parametrize("seed", range(4))
def test_conflict_averse_simplex_beats_random_simplex_points(seed: int) -> None:
    k = 5
    j = solver_jacobian("opposed" if seed % 2 else "random", k, 8, seed)
    g = j @ j.T
    beta = torch.full((k,), 1 / k, dtype=torch.float64)
    radius = 0.5 * float((beta @ j).norm())

    def objective(w: Tensor) -> Tensor:
        return w @ g @ beta + radius * (w @ g @ w).clamp_min(0).sqrt()

    w = conflict_averse_simplex(g, center=beta, radius=radius)
    samples = torch.distributions.Dirichlet(torch.full((k,), 0.3, dtype=torch.float64))
    torch.manual_seed(seed)
    others = samples.sample((20000,))
    values = (others @ g @ beta) + radius * ((others @ g) * others).sum(1).clamp_min(0).sqrt()
    assert float(objective(w)) <= float(values.min()) + 1e-10 * float(g.diagonal().mean())


def test_conflict_averse_simplex_symmetric_case_and_errors() -> None:
    w = conflict_averse_simplex(torch.eye(2), center=torch.tensor([0.5, 0.5]), radius=0.2)
    torch.testing.assert_close(w, torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match="radius"):
        conflict_averse_simplex(torch.eye(2), center=torch.tensor([0.5, 0.5]), radius=-1.0)


def test_normalize_gramian() -> None:
    # mean diagonal (2 + 6) / 2 = 4
    torch.testing.assert_close(
        normalize_gramian(torch.tensor([[2.0, 1.0], [1.0, 6.0]])),
        torch.tensor([[0.5, 0.25], [0.25, 1.5]]),
    )
    torch.testing.assert_close(normalize_gramian(torch.zeros(2, 2)), torch.zeros(2, 2))
