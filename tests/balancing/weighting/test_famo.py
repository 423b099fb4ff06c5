"""FAMO (Liu et al., NeurIPS 2023): both logit updates, scale invariance, absent tasks."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import Tensor

from polytask.balancing.weighting import (
    FAMO,
)

ALL = torch.tensor([True, True])


def test_famo_hand_case_next_call_variant() -> None:
    famo = FAMO(["a", "b"], beta=0.025, gamma=0.001)
    # call 1: ξ = 0 ⇒ z = (.5, .5); c = 1 / (.5/1 + .5/4) = 1.6; w = c z / L = (0.8, 0.2)
    total, w = famo.combine(torch.tensor([1.0, 4.0]), ALL)
    assert w.tolist() == pytest.approx([0.8, 0.2])
    assert float(total) == pytest.approx(1.6 * 0.5 * math.log(4.0), rel=1e-6)
    assert famo.logits.tolist() == [0.0, 0.0]
    # call 2 (L = (0.5, 4)): Δ = log L(t) - log L(t+1) = (ln 2, 0); Σ z Δ = ln 2 / 2
    # δ = z (Δ - Σ z Δ) = (ln 2 / 4, -ln 2 / 4); ξ = 0 - β (δ + γ 0) = ∓0.025 ln 2 / 4
    _, w = famo.combine(torch.tensor([0.5, 4.0]), ALL)
    xi = 0.025 * math.log(2.0) / 4
    assert famo.logits.tolist() == pytest.approx([-xi, xi], rel=1e-5)
    za = 1 / (1 + math.exp(2 * xi))
    zb = 1 - za
    c = 1 / (za / 0.5 + zb / 4.0)
    assert w.tolist() == pytest.approx([c * za / 0.5, c * zb / 4.0], rel=1e-5)
    assert float(w.sum()) == pytest.approx(1.0)


def test_famo_update_is_the_papers_same_batch_variant() -> None:
    famo = FAMO(["a", "b"], beta=0.1, gamma=0.5)
    famo.combine(torch.tensor([2.0, 2.0]), ALL)
    famo.update(torch.tensor([1.0, 2.0]))  # same batch after the step: Δ = (ln 2, 0)
    # δ = (ln 2 / 4, -ln 2 / 4); ξ = 0 - 0.1 (δ + 0.5 * 0)
    xi = 0.1 * math.log(2.0) / 4
    assert famo.logits.tolist() == pytest.approx([-xi, xi], rel=1e-5)
    assert not bool(famo.previous_present.any())  # consumed: the next call does not update
    famo.combine(torch.tensor([1.0, 2.0]), ALL)
    assert famo.logits.tolist() == pytest.approx([-xi, xi], rel=1e-5)
    # a second update now includes the decay: ξ ← ξ - β (δ + γ ξ), here with Δ = 0 ⇒ δ = 0
    famo.update(torch.tensor([1.0, 2.0]))
    assert famo.logits.tolist() == pytest.approx([-xi * 0.95, xi * 0.95], rel=1e-5)


def test_famo_moves_weight_to_the_task_whose_log_loss_falls_slowest() -> None:
    # Δ = -log(0.9) vs -log(0.99) per call: the slow task's logit rises at every call
    famo = FAMO(["fast", "slow"], beta=0.25)
    slow = []
    for step in range(120):
        _, w = famo.combine(torch.tensor([0.9**step, 0.99**step]), ALL)
        slow.append(float(torch.softmax(famo.logits, 0)[1]))
    assert all(b > a for a, b in itertools.pairwise(slow[1:]))  # call 1 has no update
    assert slow[-1] > 0.6
    assert float(w.sum()) == pytest.approx(1.0)


def test_famo_direction_is_invariant_to_loss_scales() -> None:
    theta = torch.tensor([0.5, -1.0, 2.0], requires_grad=True)

    def direction(scales: Tensor) -> Tensor:
        famo = FAMO(["a", "b"])
        famo.logits.copy_(torch.tensor([0.3, -0.2]))
        theta.grad = None
        losses = scales * torch.stack([(theta - 1).pow(2).sum(), theta[0] ** 2 + theta[2] ** 4])
        famo.backward(losses)
        assert theta.grad is not None
        return theta.grad / theta.grad.norm()

    assert torch.allclose(
        direction(torch.tensor([1.0, 1.0])), direction(torch.tensor([1e3, 1e-3])), atol=1e-5
    )


def test_famo_absent_tasks_are_left_out_of_the_update() -> None:
    famo = FAMO(["a", "b", "c"])
    famo.combine(torch.tensor([1.0, 1.0, 1.0]), torch.tensor([True, True, True]))
    # c absent now: only a and b are compared; z over (a, b) = (.5, .5)
    _, w = famo.combine(torch.tensor([0.5, 1.0, 0.0]), torch.tensor([True, True, False]))
    assert float(famo.logits[2]) == 0.0 and float(w[2]) == 0.0
    xi = 0.025 * math.log(2.0) / 4
    assert famo.logits.tolist()[:2] == pytest.approx([-xi, xi], rel=1e-4)
