"""PCGrad (Yu et al., NeurIPS 2020): hand case, the projection properties against a naive
re-implementation, exact reported weights, the checkpointed random order, a training step."""

from __future__ import annotations

import copy
import itertools
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_steps import tiny_steps
from torch import Tensor

from polytask.balancing.aggregation._pcgrad import PCGrad, pcgrad_coefficients
from polytask.errors import ConfigError


def _train_step(name: str, **params: Any) -> None:
    """One real step on a tiny model: every parameter gets a finite gradient."""
    tiny_steps(name, **params)


def _naive_pcgrad(j: Tensor, orders: Tensor) -> tuple[list[Tensor], float]:
    """Algorithm 1 on the rows themselves; also returns the worst inner product between a
    projected g_i' and the g_j it was just projected against (should be ~0, never < 0)."""
    projected = []
    worst = 0.0
    for i in range(j.shape[0]):
        gi = j[i].clone()
        for jj in orders[i].tolist():
            inner = float(gi @ j[jj])
            if inner < 0:
                gi = gi - inner / float(j[jj] @ j[jj]) * j[jj]
                worst = min(worst, float(gi @ j[jj]) / float(j[jj].norm() * gi.norm() + 1e-30))
        projected.append(gi)
    return projected, worst


def test_hand_case() -> None:
    # g1 = (1, 0), g2 = (-1, 1): <g1, g2> = -1 < 0.
    # g1' = g1 - (-1 / ||g2||²) g2 = (1, 0) + 0.5 (-1, 1) = (0.5, 0.5)
    # g2' = g2 - (-1 / ||g1||²) g1 = (-1, 1) + (1, 0) = (0, 1)
    # sum = (0.5, 1.5) = 2 g1 + 1.5 g2
    j = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
    update, weights = PCGrad(["a", "b"]).aggregate(j, torch.ones(2))
    torch.testing.assert_close(update, torch.tensor([0.5, 1.5]))
    torch.testing.assert_close(weights, torch.tensor([2.0, 1.5]))
    update, weights = PCGrad(["a", "b"], reduction="mean").aggregate(j, torch.ones(2))
    torch.testing.assert_close(update, torch.tensor([0.25, 0.75]))


@pytest.mark.parametrize("seed", range(20))
def test_two_tasks_update_conflicts_with_neither(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    j = torch.randn(2, 10, generator=gen, dtype=torch.float64)
    j[1] = -(0.5 + seed / 10) * j[0] + 0.3 * j[1]  # conflicting, various norms
    update, weights = PCGrad(["a", "b"], seed=seed).aggregate(j, torch.ones(2))
    inner = j @ update
    assert float(inner.min()) >= -1e-10 * float(j.norm()) ** 2
    torch.testing.assert_close(weights @ j, update)


@pytest.mark.parametrize(("k", "seed"), list(itertools.product([3, 5, 12], range(4))))
def test_matches_the_naive_algorithm_and_projections_remove_conflicts(k: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    j = torch.randn(k, 30, generator=gen, dtype=torch.float64)
    j[1] = -0.95 * j[0] + 0.1 * j[1]
    j = j * torch.logspace(-1, 1, k, dtype=torch.float64)[:, None]
    orders = torch.stack(
        [
            torch.tensor([x for x in torch.randperm(k, generator=gen).tolist() if x != i])
            for i in range(k)
        ]
    )
    coef = pcgrad_coefficients(j @ j.T, orders)
    projected, worst = _naive_pcgrad(j, orders)
    assert worst >= -1e-12
    torch.testing.assert_close(coef @ j, torch.stack(projected))
    # the aggregator itself: weights @ J == update exactly
    balancer = PCGrad([str(i) for i in range(k)], seed=seed)
    update, weights = balancer.aggregate(j, torch.ones(k))
    assert torch.equal(weights @ j, update)


def test_orders_are_permutations_of_the_other_tasks() -> None:
    orders = PCGrad(["a"] * 1, seed=3).draw_orders(6)
    assert orders.shape == (6, 5)
    for i, row in enumerate(orders.tolist()):
        assert sorted(row) == [x for x in range(6) if x != i]


def test_random_stream_is_seeded_and_checkpointed() -> None:
    k = 6
    j = torch.randn(k, 8, generator=torch.Generator().manual_seed(0))
    j[1] = -j[0] + 0.1 * j[1]
    j[2] = -j[0] + 0.1 * j[2]
    names = [str(i) for i in range(k)]
    a = PCGrad(names, seed=7)
    for _ in range(3):
        a.aggregate(j, torch.ones(k))
    state = copy.deepcopy(a.state_dict())
    expected = [a.aggregate(j, torch.ones(k))[1] for _ in range(3)]
    b = PCGrad(names, seed=123)  # a different seed: the loaded state must win
    b.load_state_dict(state)
    got = [b.aggregate(j, torch.ones(k))[1] for _ in range(3)]
    for e, g in zip(expected, got, strict=True):
        assert torch.equal(e, g)
    c = PCGrad(names, seed=7)
    first = [c.aggregate(j, torch.ones(k))[1] for _ in range(6)]
    assert all(torch.equal(x, y) for x, y in zip(first[3:], expected, strict=True))


def test_random_stream_survives_a_safetensors_checkpoint(tmp_path: Path) -> None:
    from polytask.train.checkpoint import load_checkpoint, save_checkpoint

    j = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    j[1] = -j[0] + 0.1 * j[1]
    j[3] = -j[2] + 0.1 * j[3]
    a = PCGrad(list("abcd"), seed=5)
    a.aggregate(j, torch.ones(4))
    save_checkpoint(tmp_path / "c.safetensors", {"balancer": a.state_dict()})
    b = PCGrad(list("abcd"), seed=0)
    b.load_state_dict(load_checkpoint(tmp_path / "c.safetensors")["balancer"])
    for _ in range(3):
        assert torch.equal(a.aggregate(j, torch.ones(4))[1], b.aggregate(j, torch.ones(4))[1])


def test_agreeing_tasks_are_summed_and_errors() -> None:
    j = torch.tensor([[1.0, 2.0], [1.0, 1.0], [0.0, 1.0]])  # pairwise non-negative products
    update, weights = PCGrad(["a", "b", "c"]).aggregate(j, torch.ones(3))
    torch.testing.assert_close(weights, torch.ones(3))
    torch.testing.assert_close(update, j.sum(0))
    # zero rows and K = 1 stay finite
    update, weights = PCGrad(["a", "b"]).aggregate(
        torch.tensor([[0.0, 0.0], [1.0, 0.0]]), torch.ones(2)
    )
    torch.testing.assert_close(update, torch.tensor([1.0, 0.0]))
    update, weights = PCGrad(["a"]).aggregate(torch.tensor([[3.0, 4.0]]), torch.ones(1))
    torch.testing.assert_close(update, torch.tensor([3.0, 4.0]))
    with pytest.raises(ConfigError, match="reduction"):
        PCGrad(["a"], reduction="max")
    with pytest.raises(ConfigError, match="update_every"):
        PCGrad(["a"], update_every=2)


@pytest.mark.parametrize("params", [{}, {"reduction": "mean", "seed": 3}, {"level": "features"}])
def test_training_step(params: dict[str, Any]) -> None:
    _train_step("pcgrad", **params)
