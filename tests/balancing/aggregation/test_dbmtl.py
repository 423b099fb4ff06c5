"""DB-MTL gradient balancing (Lin et al., 2023): the EMA with decaying β by hand, every task's
contribution has the largest norm, the lazily sized EMA checkpointed, absent tasks, zero
gradients, a real training step."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from tiny_steps import tiny_steps

from polytask.balancing import BALANCERS
from polytask.balancing.aggregation._dbmtl import DBMTL
from polytask.errors import ConfigError


def _train_step(name: str, **params: Any) -> Any:
    """Real steps on a tiny model (the second with a task absent): finite gradients."""
    return tiny_steps(name, presents=(None, torch.tensor([True, False, True])), **params)[2]


def test_hand_case_two_steps() -> None:
    agg = DBMTL(["a", "b"], beta=0.9, beta_sigma=0.5)
    # Step t = 0: β_0 = 0.9 / 1^0.5 = 0.9; ĝ = 0.9·0 + 0.1·g.
    # g1 = (3, 4) (norm 5) → ĝ1 = (0.3, 0.4), norm 0.5; g2 = (0, 1) → ĝ2 = (0, 0.1), norm 0.1.
    # Factors max/‖ĝ_i‖ = (0.5/0.5, 0.5/0.1) = (1, 5); update = (0.3, 0.4) + 5·(0, 0.1) = (0.3, 0.9)
    j1 = torch.tensor([[3.0, 4.0], [0.0, 1.0]], dtype=torch.float64)
    update, weights = agg.aggregate(j1, torch.ones(2))
    torch.testing.assert_close(weights, torch.tensor([1.0, 5.0], dtype=torch.float64))
    torch.testing.assert_close(update, torch.tensor([0.3, 0.9], dtype=torch.float64))
    # Step t = 1: β_1 = 0.9 / 2^0.5 = 0.63640; 1 − β_1 = 0.36360.
    # g1 = (1, 0): ĝ1 = 0.63640·(0.3, 0.4) + 0.36360·(1, 0) = (0.55452, 0.25456), norm 0.61016
    # g2 = (0, 2): ĝ2 = 0.63640·(0, 0.1) + 0.36360·(0, 2) = (0, 0.79085), norm 0.79085
    # factors = (0.79085/0.61016, 1) = (1.29613, 1)
    # update = 1.29613·(0.55452, 0.25456) + (0, 0.79085) = (0.71874, 1.12079)
    j2 = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    update, weights = agg.aggregate(j2, torch.ones(2))
    b1 = 0.9 / 2**0.5
    e1 = b1 * torch.tensor([0.3, 0.4]).double() + (1 - b1) * torch.tensor([1.0, 0.0]).double()
    e2 = b1 * torch.tensor([0.0, 0.1]).double() + (1 - b1) * torch.tensor([0.0, 2.0]).double()
    f1 = float(e2.norm() / e1.norm())
    assert f1 == pytest.approx(1.29613, abs=1e-5)
    torch.testing.assert_close(weights, torch.tensor([f1, 1.0], dtype=torch.float64))
    torch.testing.assert_close(update, f1 * e1 + e2)
    expected = torch.tensor([0.71874, 1.12079], dtype=torch.float64)
    torch.testing.assert_close(update, expected, atol=1e-5, rtol=0)
    assert int(agg.ema_steps) == 2


@pytest.mark.parametrize("k", [1, 2, 5, 12])
def test_every_contribution_has_the_largest_norm(k: int) -> None:
    gen = torch.Generator().manual_seed(k)
    agg = DBMTL([f"t{i}" for i in range(k)], beta=0.5, beta_sigma=0.0)
    for _ in range(4):
        j = torch.randn(k, 30, generator=gen, dtype=torch.float64)
        j = j * torch.logspace(-3, 3, k, dtype=torch.float64)[:, None]
        update, factors = agg.aggregate(j, torch.ones(k))
        contributions = factors[:, None] * agg.grad_ema
        norms = contributions.norm(dim=1)
        top = agg.grad_ema.norm(dim=1).max()
        torch.testing.assert_close(norms, top.expand(k), rtol=1e-10, atol=0)
        torch.testing.assert_close(update, contributions.sum(0))


def test_agreeing_tasks_give_a_multiple_of_the_mean() -> None:
    g = torch.tensor([1.0, -2.0, 2.0])
    update, factors = DBMTL(list("abc")).aggregate(g.repeat(3, 1), torch.ones(3))
    torch.testing.assert_close(factors, torch.ones(3))
    torch.testing.assert_close(update, 3 * 0.1 * g)  # first step: ĝ = (1 − 0.9) g


def test_zero_gradients() -> None:
    agg = DBMTL(["a", "b"])
    update, factors = agg.aggregate(torch.tensor([[1.0, 1.0], [0.0, 0.0]]), torch.ones(2))
    assert factors.tolist() == [1.0, 0.0]  # a zero EMA gets factor 0
    torch.testing.assert_close(update, torch.tensor([0.1, 0.1]))
    update, factors = DBMTL(["a", "b"]).aggregate(torch.zeros(2, 3), torch.ones(2))
    assert torch.equal(update, torch.zeros(3)) and torch.equal(factors, torch.ones(2))


def test_state_dict_round_trip_into_a_fresh_module() -> None:
    gen = torch.Generator().manual_seed(0)
    jacobians = [torch.randn(3, 7, generator=gen) for _ in range(5)]
    first = DBMTL(list("abc"))
    for j in jacobians[:2]:
        first.aggregate(j, torch.ones(3))
    state = {k: v.clone() for k, v in first.state_dict().items()}
    assert state["grad_ema"].shape == (3, 7)  # K × P: K copies of the shared parameters
    fresh = DBMTL(list("abc"))  # its EMA is not allocated yet
    fresh.load_state_dict(state)
    for j in jacobians[2:]:
        a, fa = first.aggregate(j, torch.ones(3))
        b, fb = fresh.aggregate(j, torch.ones(3))
        assert torch.equal(a, b) and torch.equal(fa, fb)
    assert torch.equal(first.grad_ema, fresh.grad_ema) and int(fresh.ema_steps) == 5


def test_absent_tasks_keep_their_ema() -> None:
    agg = DBMTL(list("abc"), beta_sigma=0.0)
    agg.aggregate(torch.ones(3, 2), torch.ones(3))  # every EMA = 0.1·(1, 1)
    _, factors = agg.aggregate(
        torch.tensor([[2.0, 0.0], [0.0, 4.0]]), torch.ones(2), rows=torch.tensor([0, 2])
    )
    # a: 0.9·(0.1, 0.1) + 0.1·(2, 0) = (0.29, 0.09); c: 0.9·(0.1, 0.1) + 0.1·(0, 4) = (0.09, 0.49)
    torch.testing.assert_close(agg.grad_ema[1], torch.tensor([0.1, 0.1]))  # b untouched
    torch.testing.assert_close(agg.grad_ema[0], torch.tensor([0.29, 0.09]))
    torch.testing.assert_close(agg.grad_ema[2], torch.tensor([0.09, 0.49]))
    assert factors.shape == (2,)
    with pytest.raises(ValueError, match="columns"):
        agg.aggregate(torch.ones(3, 5), torch.ones(3))  # the shared parameters changed


def test_training_step() -> None:
    balancer = _train_step("db_mtl")
    assert int(balancer.ema_steps) == 2


def test_registry_and_errors() -> None:
    assert BALANCERS.get("db_mtl") is DBMTL
    assert set(BALANCERS.parameters("db_mtl")) == {"beta", "beta_sigma", "level", "update_every"}
    with pytest.raises(ConfigError, match="level"):
        DBMTL(["a"], level="features")
    with pytest.raises(ConfigError, match="beta"):
        DBMTL(["a"], beta=1.0)
    with pytest.raises(ConfigError, match="beta_sigma"):
        DBMTL(["a"], beta_sigma=-1.0)
