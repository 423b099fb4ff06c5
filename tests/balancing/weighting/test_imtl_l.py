"""IMTL-L (Liu et al., ICLR 2021): the scaled losses are driven to 1."""

from __future__ import annotations

import math

import pytest
import torch

from polytask.balancing.weighting import (
    IMTLL,
)


def test_imtl_l_hand_case() -> None:
    imtl = IMTLL(["a", "b", "c"])
    with torch.no_grad():
        imtl.log_scales.copy_(torch.tensor([math.log(2.0), 0.0, 1.0]))
    losses = torch.tensor([3.0, 0.5, 9.0])
    total, w = imtl.combine(losses, torch.tensor([True, True, False]))
    # a: e^{ln 2} * 3 - ln 2 = 6 - 0.6931; b: 1 * 0.5 - 0; c absent: nothing
    assert float(total.detach()) == pytest.approx(6.5 - math.log(2.0))
    assert w.tolist() == pytest.approx([2.0, 1.0, 0.0])
    total.backward()
    # ∂/∂s = e^{s} L - 1 = (5, -0.5, 0)
    assert imtl.log_scales.grad is not None
    assert imtl.log_scales.grad.tolist() == pytest.approx([5.0, -0.5, 0.0])


def test_imtl_l_scaled_losses_converge_to_one() -> None:
    # optimising s alone: ∂/∂s_k = e^{s_k} L_k - 1 = 0 ⇒ e^{s_k} L_k = 1, whatever the scale
    imtl = IMTLL(list("abcd"))
    losses = torch.tensor([0.1, 0.5, 1.5, 3.0])
    opt = torch.optim.SGD(imtl.parameters(), lr=0.3)
    for _ in range(300):
        opt.zero_grad()
        imtl.combine(losses, torch.ones(4, dtype=torch.bool))[0].backward()
        opt.step()
    scaled = torch.exp(imtl.log_scales.detach()) * losses
    assert scaled.tolist() == pytest.approx([1.0] * 4, rel=1e-4)
