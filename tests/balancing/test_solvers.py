"""The exact small solvers shared by the gradient aggregators (``aggregators/_solvers.py``):
hand cases, KKT conditions on random and degenerate Gramians, brute-force comparisons."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch import Tensor

from polytask.balancing.aggregators._solvers import (
    conflict_averse_simplex,
    min_norm_simplex,
    nonnegative_qp,
    normalize_gramian,
    project_onto_dual_cone,
)


def _jacobian(kind: str, k: int, p: int, seed: int) -> Tensor:
    """Random Jacobians, plus the degenerate shapes the solvers must survive."""
    gen = torch.Generator().manual_seed(seed)
    j = torch.randn(k, p, generator=gen, dtype=torch.float64)
    if kind == "duplicates" and k >= 3:
        j[1] = j[0]
        j[2] = 0.0
    elif kind == "scales":
        j = j * torch.logspace(-4, 4, k, dtype=torch.float64)[:, None]
    elif kind == "opposed":
        j[1] = -0.95 * j[0] + 0.05 * j[1]
    elif kind == "low_rank":
        j = j[:, :2] @ torch.randn(2, p, generator=gen, dtype=torch.float64)
    return j


KINDS = ["random", "duplicates", "scales", "opposed", "low_rank"]
CASES = [(kind, k, seed) for kind in KINDS for k in (2, 3, 7, 40) for seed in (0, 1)]


# ---------------------------------------------------------------------------- nonnegative_qp
def test_nonnegative_qp_hand_case() -> None:
    # min ½(2x² + 2y²) - 2x + 4y over x, y >= 0: unconstrained optimum (1, -2) -> y = 0, x = 1
    x = nonnegative_qp(np.array([[2.0, 0.0], [0.0, 2.0]]), np.array([-2.0, 4.0]))
    np.testing.assert_allclose(x, [1.0, 0.0])


@pytest.mark.parametrize("seed", range(5))
def test_nonnegative_qp_kkt_on_singular_problems(seed: int) -> None:
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((12, 3))
    q = a @ a.T  # rank 3: singular
    c = q @ rng.standard_normal(12)  # in the range of Q: bounded below
    x = nonnegative_qp(q, c)
    grad = q @ x + c
    scale = np.abs(q).max()
    assert (x >= 0).all()
    assert grad.min() >= -1e-9 * scale
    assert np.abs(x * grad).max() <= 1e-9 * scale * max(1.0, x.max())


# ---------------------------------------------------------------------------- min_norm_simplex
def test_min_norm_simplex_two_tasks_by_hand() -> None:
    # g1 = (1, 0), g2 = (0, 2): w1 = ((g2-g1)·g2) / ||g1-g2||² = ((-1)(0) + (2)(2)) / (1 + 4) = 0.8
    g = torch.tensor([[1.0, 0.0], [0.0, 4.0]])
    torch.testing.assert_close(min_norm_simplex(g), torch.tensor([0.8, 0.2]))
    # g1 = (1, 0), g2 = (3, 0): ((2)(3)) / 4 = 1.5 -> clipped to 1 (g1 is the min-norm point)
    g = torch.tensor([[1.0, 3.0], [3.0, 9.0]])
    torch.testing.assert_close(min_norm_simplex(g), torch.tensor([1.0, 0.0]))


@pytest.mark.parametrize(("kind", "k", "seed"), CASES)
def test_min_norm_simplex_satisfies_kkt(kind: str, k: int, seed: int) -> None:
    j = _jacobian(kind, k, 50, seed)
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
    j = _jacobian("random", 6, 10, 3)
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


# ---------------------------------------------------------------------------- dual cone
def test_project_onto_dual_cone_by_hand() -> None:
    # g1 = (1, 0), g2 = (-1, 1): projecting g1 onto {x : x·g2 >= 0} removes -(1/2) g2:
    # π(g1) = g1 + 0.5 g2 = (0.5, 0.5), so v = (1, 0.5); g2: π(g2) = g2 + g1 = (0, 1), v = (1, 1)
    g = torch.tensor([[1.0, -1.0], [-1.0, 2.0]])
    v = project_onto_dual_cone(g, torch.eye(2))
    torch.testing.assert_close(v, torch.tensor([[1.0, 0.5], [1.0, 1.0]]))


@pytest.mark.parametrize(("kind", "k", "seed"), [c for c in CASES if c[1] <= 7])
def test_project_onto_dual_cone_satisfies_kkt(kind: str, k: int, seed: int) -> None:
    j = _jacobian(kind, k, 50, seed)
    g = j @ j.T
    u = torch.rand(k, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    v = project_onto_dual_cone(g, u)
    assert v.shape == u.shape
    gv = v @ g  # row m: (G v_m)
    tol = 1e-9 * float(g.diagonal().mean()) * max(1.0, float(v.abs().max()))
    assert (v >= u - 1e-12).all()
    assert float(gv.min()) >= -tol  # the projection conflicts with no row of J
    assert float(((v - u > 1e-9) * gv.abs()).max()) <= tol  # complementary slackness


def test_project_onto_dual_cone_matches_the_primal_projection() -> None:
    from scipy.optimize import minimize

    rng = np.random.default_rng(0)
    j = rng.standard_normal((3, 4))
    j[1] = -0.8 * j[0] + 0.3 * j[1]
    target = j[1]  # project g2 onto {x : Jx >= 0}
    res = minimize(
        lambda x: float(((x - target) ** 2).sum()),
        target.copy(),
        jac=lambda x: 2 * (x - target),
        constraints={"type": "ineq", "fun": lambda x: j @ x, "jac": lambda x: j},
        method="SLSQP",
        options={"ftol": 1e-14, "maxiter": 500},
    )
    v = project_onto_dual_cone(torch.tensor(j @ j.T), torch.tensor([0.0, 1.0, 0.0]))
    np.testing.assert_allclose(v.numpy() @ j, res.x, atol=1e-6)


def test_project_onto_dual_cone_checks_shapes() -> None:
    with pytest.raises(ValueError, match="`u` should have shape"):
        project_onto_dual_cone(torch.eye(3), torch.ones(2))


# ---------------------------------------------------------------------------- CAGrad's dual
@pytest.mark.parametrize("seed", range(4))
def test_conflict_averse_simplex_beats_random_simplex_points(seed: int) -> None:
    k = 5
    j = _jacobian("opposed" if seed % 2 else "random", k, 8, seed)
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
