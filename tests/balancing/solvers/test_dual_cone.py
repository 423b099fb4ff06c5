"""``project_onto_dual_cone`` (UPGrad, DualProj): by hand, KKT conditions, the primal projection."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_steps import SOLVER_CASES, solver_jacobian

from polytask.balancing.solvers import (
    project_onto_dual_cone,
)


def test_project_onto_dual_cone_by_hand() -> None:
    # g1 = (1, 0), g2 = (-1, 1): projecting g1 onto {x : x·g2 >= 0} removes -(1/2) g2:
    # π(g1) = g1 + 0.5 g2 = (0.5, 0.5), so v = (1, 0.5); g2: π(g2) = g2 + g1 = (0, 1), v = (1, 1)
    g = torch.tensor([[1.0, -1.0], [-1.0, 2.0]])
    v = project_onto_dual_cone(g, torch.eye(2))
    torch.testing.assert_close(v, torch.tensor([[1.0, 0.5], [1.0, 1.0]]))


@pytest.mark.parametrize(("kind", "k", "seed"), [c for c in SOLVER_CASES if c[1] <= 7])
def test_project_onto_dual_cone_satisfies_kkt(kind: str, k: int, seed: int) -> None:
    j = solver_jacobian(kind, k, 50, seed)
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
