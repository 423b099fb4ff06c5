"""GradVac (Wang et al., ICLR 2021): the correction reaches the target cosine exactly, the EMA of
the targets, exact reported weights against a naive re-implementation on the rows, the
checkpointed targets and random order, absent tasks, a real training step."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from tiny_steps import tiny_steps
from torch import Tensor

from polytask.balancing import BALANCERS
from polytask.balancing.aggregation._gradvac import GradVac, gradvac_coefficients
from polytask.errors import ConfigError


def _train_step(name: str, **params: Any) -> Any:
    """Real steps on a tiny model (the second with a task absent): finite gradients."""
    return tiny_steps(name, presents=(None, torch.tensor([True, False, True])), **params)[2]


def _cos(a: Tensor, b: Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()))


def _naive_gradvac(
    j: Tensor, targets: Tensor, beta: float, orders: list[list[int]]
) -> tuple[Tensor, Tensor]:
    """The paper's loop on the rows themselves: (corrected rows, new targets)."""
    out = []
    new = targets.clone()
    for i in range(j.shape[0]):
        gi = j[i].clone()
        for jj in orders[i]:
            if jj == i:
                continue
            phi = _cos(gi, j[jj])
            t = float(targets[i, jj])
            if phi < t:
                gi = gi + j[jj] * float(gi.norm()) * (
                    t * math.sqrt(1 - phi**2) - phi * math.sqrt(1 - t**2)
                ) / (float(j[jj].norm()) * math.sqrt(1 - t**2))
            new[i, jj] = (1 - beta) * t + beta * phi
        out.append(gi)
    return torch.stack(out), new


def test_hand_case_two_dimensions() -> None:
    # g1 = (1, 0), g2 = (0, 1): φ = cos = 0; targets φ̂ = 1/2 for both pairs (cos 60°).
    # w = ‖g1‖ (φ̂ √(1−φ²) − φ √(1−φ̂²)) / (‖g2‖ √(1−φ̂²)) = (0.5·1 − 0) / √0.75 = 1/√3
    # g1' = (1, 1/√3): cos(g1', g2) = (1/√3) / √(1 + 1/3) = (1/√3) / (2/√3) = 1/2 = φ̂ ✓
    # symmetrically g2' = (1/√3, 1); update = (1 + 1/√3, 1 + 1/√3), weights = 1ᵀC = the same.
    # EMA: φ̂ ← 0.99 · 0.5 + 0.01 · 0 = 0.495.
    agg = GradVac(["a", "b"], beta=0.01)
    agg.targets.fill_(0.5)
    j = torch.eye(2, dtype=torch.float64)
    update, weights = agg.aggregate(j, torch.ones(2))
    s = 1 + 1 / math.sqrt(3)
    torch.testing.assert_close(update, torch.tensor([s, s], dtype=torch.float64))
    torch.testing.assert_close(weights, torch.tensor([s, s], dtype=torch.float64))
    off = ~torch.eye(2, dtype=torch.bool)
    torch.testing.assert_close(agg.targets[off], torch.full((2,), 0.495, dtype=torch.float64))
    coeffs, _ = gradvac_coefficients(np.eye(2), np.full((2, 2), 0.5), 0.01, [[1], [0]])
    g1 = torch.from_numpy(coeffs[0]) @ j
    assert _cos(g1, j[1]) == pytest.approx(0.5, abs=1e-12)


def test_ema_of_the_targets_by_hand() -> None:
    # Targets start at 0. g1 = (1, 0), g2 = (1, 1): cos = 1/√2 ≈ 0.7071 > 0: no correction.
    # Step 1: φ̂ = 0.9·0 + 0.1·0.7071 = 0.07071; step 2: 0.9·0.07071 + 0.1·0.7071 = 0.13435.
    agg = GradVac(["a", "b"], beta=0.1)
    j = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    c = 1 / math.sqrt(2)
    for expected in (0.1 * c, 0.9 * 0.1 * c + 0.1 * c):
        _, weights = agg.aggregate(j, torch.ones(2))
        torch.testing.assert_close(weights, torch.ones(2, dtype=torch.float64))  # plain sum
        assert float(agg.targets[0, 1]) == pytest.approx(expected, rel=1e-12)
        assert float(agg.targets[1, 0]) == pytest.approx(expected, rel=1e-12)
    assert float(agg.targets[0, 0]) == 0.0  # the diagonal is never touched


@pytest.mark.parametrize("seed", range(10))
def test_correction_reaches_the_target_cosine(seed: int) -> None:
    # One pair with cos(g1, g2) < φ̂: after the correction, cos(g1', g2) = φ̂ exactly.
    gen = torch.Generator().manual_seed(seed)
    j = torch.randn(2, 20, generator=gen, dtype=torch.float64)
    j[1] = j[1] * (0.1 + seed)  # various norms
    phi = _cos(j[0], j[1])
    target = min(phi + 0.3, 0.95)
    coeffs, _ = gradvac_coefficients(
        (j @ j.T).numpy(), np.full((2, 2), target), 0.01, [[0, 1], [1, 0]]
    )
    corrected = torch.from_numpy(coeffs) @ j
    assert _cos(corrected[0], j[1]) == pytest.approx(target, abs=1e-9)
    assert _cos(corrected[1], j[0]) == pytest.approx(target, abs=1e-9)


@pytest.mark.parametrize("k", [2, 3, 5, 8])
def test_matches_the_rows_loop_and_weights_are_exact(k: int) -> None:
    gen = torch.Generator().manual_seed(k)
    j = torch.randn(k, 12, generator=gen, dtype=torch.float64)
    j = j * torch.logspace(-1, 1, k, dtype=torch.float64)[:, None]
    targets = 0.6 * torch.rand(k, k, generator=gen, dtype=torch.float64) - 0.1
    orders = [torch.randperm(k, generator=gen).tolist() for _ in range(k)]
    coeffs, new = gradvac_coefficients((j @ j.T).numpy(), targets.numpy(), 0.3, orders)
    rows, naive_new = _naive_gradvac(j, targets, 0.3, orders)
    torch.testing.assert_close(torch.from_numpy(coeffs) @ j, rows, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(torch.from_numpy(new), naive_new, rtol=1e-9, atol=1e-12)
    # the aggregator reports weights = 1ᵀC and its update is exactly weights @ J
    agg = GradVac([f"t{i}" for i in range(k)])
    agg.targets.copy_(targets)
    update, weights = agg.aggregate(j, torch.ones(k))
    assert torch.equal(update, weights @ j)


def test_agreeing_tasks_are_left_alone() -> None:
    # cos = 1 ≥ any target: no correction, the update is the sum
    g = torch.tensor([0.5, -1.0, 2.0])
    agg = GradVac(list("abc"))
    agg.targets.fill_(0.9)
    update, weights = agg.aggregate(g.repeat(3, 1), torch.ones(3))
    torch.testing.assert_close(update, 3 * g)
    torch.testing.assert_close(weights, torch.ones(3))


def test_zero_gradient_and_one_task() -> None:
    agg = GradVac(["a", "b"])
    agg.targets.fill_(0.5)
    j = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    update, weights = agg.aggregate(j, torch.ones(2))
    torch.testing.assert_close(update, j[0])  # nothing to add from, nothing to correct
    assert torch.isfinite(weights).all()
    update, weights = GradVac(["a"]).aggregate(j[:1], torch.ones(1))
    torch.testing.assert_close(update, j[0])


def test_state_dict_round_trip_resumes_targets_and_order() -> None:
    gen = torch.Generator().manual_seed(0)
    jacobians = [torch.randn(4, 10, generator=gen) for _ in range(6)]
    first = GradVac(list("abcd"), beta=0.2, seed=3)
    for j in jacobians[:3]:
        first.aggregate(j, torch.ones(4))
    state = {k: v.clone() for k, v in first.state_dict().items()}
    second = GradVac(list("abcd"), beta=0.2, seed=3)
    second.load_state_dict(state)
    for j in jacobians[3:]:
        a, _ = first.aggregate(j, torch.ones(4))
        b, _ = second.aggregate(j, torch.ones(4))
        assert torch.equal(a, b)
    assert torch.equal(first.targets, second.targets) and int(first.draws) == 6


def test_absent_tasks_keep_their_targets() -> None:
    agg = GradVac(list("abc"), beta=0.5)
    agg.targets.fill_(0.25)
    j = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)  # tasks a and c only
    agg.aggregate(j, torch.ones(2), rows=torch.tensor([0, 2]))
    # pair (a, c): cos 0 → 0.5·0.25 + 0.5·0 = 0.125; every pair with b is unchanged
    assert float(agg.targets[0, 2]) == pytest.approx(0.125)
    assert float(agg.targets[2, 0]) == pytest.approx(0.125)
    assert float(agg.targets[0, 1]) == 0.25 and float(agg.targets[1, 2]) == 0.25
    with pytest.raises(ValueError, match="rows"):
        agg.aggregate(j, torch.ones(2))  # 2 rows for 3 tasks and no rows=


def test_training_step() -> None:
    _train_step("gradvac")


def test_registry_and_errors() -> None:
    assert BALANCERS.get("gradvac") is GradVac
    assert set(BALANCERS.parameters("gradvac")) == {"beta", "seed", "level", "update_every"}
    with pytest.raises(ConfigError, match="beta"):
        GradVac(["a"], beta=1.5)
    with pytest.raises(ConfigError, match="update_every"):
        BALANCERS.get("gradvac")(["a"], update_every=2)
