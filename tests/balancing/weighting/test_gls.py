"""Geometric Loss Strategy (Chennupati et al., CVPRW 2019): the geometric mean's gradient."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from polytask.balancing.weighting import (
    GeometricLossStrategy,
)

ALL = torch.tensor([True, True])


def test_gls_hand_case() -> None:
    gls = GeometricLossStrategy(["a", "b", "c"])
    # (1 * 9)^(1/2) = 3 over the present a, c; weights 3 / (2 * 1), 3 / (2 * 9)
    total, w = gls.combine(torch.tensor([1.0, 7.0, 9.0]), torch.tensor([True, False, True]))
    assert float(total) == pytest.approx(3.0)
    assert w.tolist() == pytest.approx([1.5, 0.0, 1 / 6])
    # K counts present tasks only: one present task ⇒ the loss itself, weight 1
    total, w = gls.combine(torch.tensor([0.0, 5.0, 0.0]), torch.tensor([False, True, False]))
    assert float(total) == pytest.approx(5.0) and w.tolist() == pytest.approx([0.0, 1.0, 0.0])


def test_gls_weights_are_the_gradient_of_the_geometric_mean() -> None:
    losses = torch.tensor([0.3, 2.0, 50.0, 4.0], dtype=torch.float64, requires_grad=True)
    present = torch.tensor([True, True, True, False])
    total, w = GeometricLossStrategy(list("abcd")).combine(losses, present)
    (grad,) = torch.autograd.grad(total, losses)
    assert torch.allclose(grad, w)
    assert float(total.detach()) == pytest.approx((0.3 * 2.0 * 50.0) ** (1 / 3))
    # every present task gets the same relative step w_k L_k = total / n
    relative = (w * losses.detach())[:3]
    assert torch.allclose(
        relative, torch.full((3,), float(total.detach()) / 3, dtype=torch.float64)
    )


def test_gls_update_direction_ignores_the_loss_scales() -> None:
    theta = torch.tensor([0.5, -1.0, 2.0], requires_grad=True)

    def direction(scales: Tensor) -> Tensor:
        theta.grad = None
        losses = scales * torch.stack([(theta - 1).pow(2).sum(), theta[0] ** 2 + theta[2] ** 4])
        GeometricLossStrategy(["a", "b"]).backward(losses)
        assert theta.grad is not None
        return theta.grad / theta.grad.norm()

    assert torch.allclose(direction(torch.tensor([1.0, 1.0])), direction(torch.tensor([1e3, 1e-3])))


def test_gls_zero_loss_is_finite() -> None:
    losses = torch.tensor([0.0, 2.0], requires_grad=True)
    total, w = GeometricLossStrategy(["a", "b"]).combine(losses, ALL)
    total.backward()
    assert torch.isfinite(total) and torch.isfinite(w).all()
    assert losses.grad is not None and torch.isfinite(losses.grad).all()
    assert w.tolist()[0] == 0.0  # clamped: no gradient, weight 0
