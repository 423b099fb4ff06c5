"""UPGrad (Quinton & Rey, 2024): hand case, comparison with explicit projections, the
non-conflicting / mean / permutation / scaling properties, preferences with absent tasks and
a training step."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pytest
import torch
from tiny_steps import cone_jacobian, step_weights

from polytask.balancing.aggregation._dual_cone import regularized_normalized_gramian
from polytask.balancing.aggregation._upgrad import UPGrad
from polytask.errors import ConfigError


def test_hand_case() -> None:
    # g1 = (1, 0), g2 = (-1, 1); the dual cone is {x1 >= 0, x2 >= x1}.
    # π(g1) = g1 - (<g1, g2> / ||g2||²) g2 = (1, 0) + 0.5 (-1, 1) = (0.5, 0.5)
    # π(g2) = g2 - (<g2, g1> / ||g1||²) g1 = (-1, 1) + (1, 0) = (0, 1)
    # d = ((0.5, 0.5) + (0, 1)) / 2 = (0.25, 0.75) = 1 g1 + 0.75 g2
    j = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
    update, weights = UPGrad(["a", "b"], reg_eps=0.0).aggregate(j, torch.ones(2))
    torch.testing.assert_close(update, torch.tensor([0.25, 0.75]))
    torch.testing.assert_close(weights, torch.tensor([1.0, 0.75]))


def test_matches_explicit_projections() -> None:
    from scipy.optimize import minimize

    j = cone_jacobian(4, 6, 1).numpy()
    projections = []
    for i in range(4):
        res = minimize(
            lambda x, i=i: float(((x - j[i]) ** 2).sum()),
            j[i].copy(),
            jac=lambda x, i=i: 2 * (x - j[i]),
            constraints={"type": "ineq", "fun": lambda x: j @ x, "jac": lambda x: j},
            method="SLSQP",
            options={"ftol": 1e-15, "maxiter": 1000},
        )
        projections.append(res.x)
    update, _ = UPGrad(list("abcd"), reg_eps=0.0).aggregate(torch.tensor(j), torch.ones(4))
    np.testing.assert_allclose(update.numpy(), np.mean(projections, axis=0), atol=1e-6)


@pytest.mark.parametrize(("k", "seed"), list(itertools.product([2, 3, 5, 10, 30], range(6))))
def test_non_conflicting(k: int, seed: int) -> None:
    j = cone_jacobian(k, 40, seed)
    scale = float((j * j).sum())
    names = [str(i) for i in range(k)]
    update, _ = UPGrad(names, reg_eps=0.0).aggregate(j, torch.ones(k))
    assert float((j @ update).min()) >= -1e-9 * scale
    # with the default ridge, conflicts are bounded by reg_eps · v_j · tr(G)
    update, weights = UPGrad(names).aggregate(j, torch.ones(k))
    assert float((j @ update).min()) >= -1e-4 * scale * float(weights.abs().max()) - 1e-12


def test_equals_the_mean_when_tasks_agree() -> None:
    g = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    update, weights = UPGrad(list("abcd")).aggregate(g.repeat(4, 1), torch.ones(4))
    torch.testing.assert_close(update, g)
    torch.testing.assert_close(weights, torch.full((4,), 0.25, dtype=torch.float64))
    # pairwise non-conflicting rows are already in the cone: the mean itself
    j = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]], dtype=torch.float64)
    update, _ = UPGrad(list("abc")).aggregate(j, torch.ones(3))
    torch.testing.assert_close(update, j.mean(0))


@pytest.mark.parametrize("seed", range(4))
def test_permutation_invariant_and_linear_under_scaling(seed: int) -> None:
    k = 6
    j = cone_jacobian(k, 20, seed)
    names = [str(i) for i in range(k)]
    update, _ = UPGrad(names).aggregate(j, torch.ones(k))
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(seed))
    permuted, _ = UPGrad(names).aggregate(j[perm], torch.ones(k))
    torch.testing.assert_close(permuted, update, rtol=1e-7, atol=1e-9)
    for a in (0.1, 7.0, 300.0):
        scaled, _ = UPGrad(names).aggregate(a * j, torch.ones(k))
        torch.testing.assert_close(scaled, a * update, rtol=1e-7, atol=1e-9)


def test_normalisation_and_errors() -> None:
    # trace 4: G / 4 + 0.25 I
    g = regularized_normalized_gramian(
        torch.tensor([[3.0, 1.0], [1.0, 1.0]]), norm_eps=1e-4, reg_eps=0.25
    )
    torch.testing.assert_close(g, torch.tensor([[1.0, 0.25], [0.25, 0.5]]))
    # a Jacobian below norm_eps counts as zero: the update is the plain mean
    j = torch.tensor([[1e-3, 0.0], [-1e-3, 1e-3]])
    update, _ = UPGrad(["a", "b"]).aggregate(j, torch.ones(2))
    torch.testing.assert_close(update, j.mean(0))
    with pytest.raises(ConfigError, match="pref_vector"):
        UPGrad(["a", "b"], pref_vector=[1.0])
    with pytest.raises(ConfigError, match="pref_vector"):
        UPGrad(["a", "b"], pref_vector=[1.0, -1.0])
    with pytest.raises(ConfigError, match="reg_eps"):
        UPGrad(["a"], reg_eps=-1.0)


def test_preference_vector() -> None:
    # identical rows: the weighted mean pᵀJ is already in the cone
    g = torch.tensor([1.0, 2.0])
    _, weights = UPGrad(["a", "b"], pref_vector=[0.2, 0.6]).aggregate(g.repeat(2, 1), torch.ones(2))
    torch.testing.assert_close(weights, torch.tensor([0.2, 0.6]))
    # an absent task: the preference entries of the present ones are used
    weights = step_weights(
        "upgrad", present=torch.tensor([True, False, True]), pref_vector=[1.0, 5.0, 1.0]
    )
    assert float(weights[1]) == 0.0


@pytest.mark.parametrize("params", [{}, {"update_every": 2}, {"level": "features"}])
def test_training_step(params: dict[str, Any]) -> None:
    step_weights("upgrad", **params)
