"""DualProj (Quinton & Rey, 2024): hand case, comparison with an explicit projection, the
non-conflicting / mean / permutation properties, preferences and a training step."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pytest
import torch
from tiny_steps import cone_jacobian, step_weights

from polytask.balancing.aggregation._dualproj import DualProj
from polytask.errors import ConfigError


def test_hand_case() -> None:
    # g1 = (1, 0), g2 = (-2, 1): the mean (-0.5, 0.5) has <mean, g1> = -0.5 < 0.
    # The cone is {x1 >= 0, x2 >= 2 x1}; the nearest point to (-0.5, 0.5) is (0, 0.5)
    # (drop the negative x1; x2 = 0.5 >= 0 holds) = 1 g1 + 0.5 g2
    j = torch.tensor([[1.0, 0.0], [-2.0, 1.0]])
    update, weights = DualProj(["a", "b"], reg_eps=0.0).aggregate(j, torch.ones(2))
    torch.testing.assert_close(update, torch.tensor([0.0, 0.5]))
    torch.testing.assert_close(weights, torch.tensor([1.0, 0.5]))


def test_matches_an_explicit_projection() -> None:
    from scipy.optimize import minimize

    j = cone_jacobian(4, 6, 1).numpy()
    mean = j.mean(0)
    res = minimize(
        lambda x: float(((x - mean) ** 2).sum()),
        mean.copy(),
        jac=lambda x: 2 * (x - mean),
        constraints={"type": "ineq", "fun": lambda x: j @ x, "jac": lambda x: j},
        method="SLSQP",
        options={"ftol": 1e-15, "maxiter": 1000},
    )
    update, _ = DualProj(list("abcd"), reg_eps=0.0).aggregate(torch.tensor(j), torch.ones(4))
    np.testing.assert_allclose(update.numpy(), res.x, atol=1e-6)


@pytest.mark.parametrize(("k", "seed"), list(itertools.product([2, 3, 5, 10, 30], range(6))))
def test_non_conflicting(k: int, seed: int) -> None:
    j = cone_jacobian(k, 40, seed)
    scale = float((j * j).sum())
    names = [str(i) for i in range(k)]
    update, _ = DualProj(names, reg_eps=0.0).aggregate(j, torch.ones(k))
    assert float((j @ update).min()) >= -1e-9 * scale
    update, weights = DualProj(names).aggregate(j, torch.ones(k))
    assert float((j @ update).min()) >= -1e-4 * scale * float(weights.abs().max()) - 1e-12


def test_equals_the_mean_when_tasks_agree_and_is_permutation_invariant() -> None:
    g = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    update, weights = DualProj(list("abc")).aggregate(g.repeat(3, 1), torch.ones(3))
    torch.testing.assert_close(update, g)
    torch.testing.assert_close(weights, torch.full((3,), 1 / 3, dtype=torch.float64))
    j = cone_jacobian(6, 20, 1)
    names = [str(i) for i in range(6)]
    update, _ = DualProj(names).aggregate(j, torch.ones(6))
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    permuted, _ = DualProj(names).aggregate(j[perm], torch.ones(6))
    torch.testing.assert_close(permuted, update, rtol=1e-7, atol=1e-9)
    scaled, _ = DualProj(names).aggregate(10 * j, torch.ones(6))
    torch.testing.assert_close(scaled, 10 * update, rtol=1e-7, atol=1e-9)


def test_preferences_and_errors() -> None:
    g = torch.tensor([1.0, 2.0])
    _, weights = DualProj(["a", "b"], pref_vector=[0.2, 0.6]).aggregate(
        g.repeat(2, 1), torch.ones(2)
    )
    torch.testing.assert_close(weights, torch.tensor([0.2, 0.6]))
    weights = step_weights(
        "dualproj", present=torch.tensor([False, True, True]), pref_vector=[1.0, 1.0, 2.0]
    )
    assert float(weights[0]) == 0.0
    with pytest.raises(ConfigError, match="norm_eps"):
        DualProj(["a"], norm_eps=-1.0)


@pytest.mark.parametrize("params", [{}, {"update_every": 2}, {"level": "features"}])
def test_training_step(params: dict[str, Any]) -> None:
    step_weights("dualproj", **params)
