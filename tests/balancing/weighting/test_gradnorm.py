"""GradNorm (Chen et al., ICML 2018): hand case, absent tasks, training rates."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from polytask.balancing import EqualWeighting
from polytask.balancing.base import Balancer
from polytask.balancing.weighting import (
    GradNorm,
)


def test_gradnorm_hand_case() -> None:
    w = nn.Parameter(torch.tensor([[2.0, 5.0], [0.0, 0.0]]))
    bias = nn.Parameter(torch.zeros(2))  # a 1-D tensor after the matrix: not the measured layer
    g = GradNorm(["a", "b"], alpha=1.0)
    assert GradNorm.shared_layer([w, bias]) is w
    # step 1: L = (3 * 2, 5) = (6, 5); ∇_W L_a = 3 e_00, ∇_W L_b = e_01 ⇒ norms (3, 1)
    # G = w * norms = (3, 1); L/L(0) = (1, 1) ⇒ r = (1, 1); target = mean G = 2 for both
    # GradNorm loss |3 - 2| + |1 - 2| = 2; ∂/∂w = (sign(1) * 3, sign(-1) * 1) = (3, -1)
    result = g.backward(torch.stack([3 * w[0, 0], w[0, 1] + bias[0]]), shared_params=[w, bias])
    assert result.weights.tolist() == [1.0, 1.0]
    assert g.weights.grad is not None and g.weights.grad.tolist() == pytest.approx([3.0, -1.0])
    assert float(result.extras["gradnorm_loss"]) == pytest.approx(2.0)
    assert g.initial_losses.tolist() == [6.0, 5.0]
    # the model gets the gradient of Σ w_k L_k = 3 W00 + W01
    assert w.grad is not None and w.grad.tolist() == [[3.0, 1.0], [0.0, 0.0]]
    # step 2: weights set to (1.5, 0.3) are renormalised to sum 2: (1.6667, 0.3333)
    with torch.no_grad():
        g.weights.copy_(torch.tensor([1.5, 0.3]))
        w[0, 0] = 1.0  # L_a = 3 ⇒ L_a / L_a(0) = 0.5; L_b = 5 ⇒ 1; mean 0.75
    g.weights.grad = None
    result = g.backward(torch.stack([3 * w[0, 0], w[0, 1]]), shared_params=[w, bias])
    wa, wb = 1.5 * 2 / 1.8, 0.3 * 2 / 1.8
    assert result.weights.tolist() == pytest.approx([wa, wb])
    # G = (3 wa, wb) = (5, 0.3333); mean 2.6667; r = (0.5, 1) / 0.75 = (2/3, 4/3)
    # target = (1.7778, 3.5556): G_a above ⇒ +3, G_b below ⇒ -1
    mean_g = (3 * wa + wb) / 2
    assert result.extras["target_norms"].tolist() == pytest.approx([mean_g * 2 / 3, mean_g * 4 / 3])
    assert g.weights.grad.tolist() == pytest.approx([3.0, -1.0])


def test_gradnorm_absent_task_gets_no_weight_and_no_gradient() -> None:
    w = nn.Parameter(torch.tensor([[1.0, 2.0, 3.0]]))
    g = GradNorm(["a", "b", "c"])
    present = torch.tensor([True, False, True])
    losses = torch.stack([w[0, 0] ** 2 + 1, w[0, 1] * 0.0, 4 * w[0, 2]])
    result = g.backward(losses, shared_params=[w], present=present)
    assert result.weights.tolist() == [1.0, 0.0, 1.0]
    assert g.weights.grad is not None and float(g.weights.grad[1]) == 0.0
    assert not bool(g.has_initial[1])
    with pytest.raises(ValueError, match="shared_params"):
        g.backward(losses, present=present)


def _slow_task_toy(balancer: Balancer, steps: int = 60) -> tuple[Tensor, Tensor]:
    """Two regressions through one shared layer; task 2's head output is scaled by 0.2, so
    under equal weighting its loss falls much more slowly. Returns (L / L(0), last weights)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 4, generator=g)
    y = torch.stack([x @ torch.randn(4, generator=g), x @ torch.randn(4, generator=g)])
    shared = nn.Parameter(torch.randn(8, 4, generator=g) * 0.5)
    heads = nn.Parameter(torch.zeros(2, 8))
    scale = torch.tensor([1.0, 0.2])
    opt = torch.optim.SGD([shared, heads, *balancer.parameters()], lr=0.05)
    first: Tensor | None = None
    for _ in range(steps):
        pred = (x @ shared.T @ heads.T) * scale
        losses = ((pred.T - y) ** 2).mean(dim=1)
        first = losses.detach() if first is None else first
        opt.zero_grad()
        result = balancer.backward(losses, shared_params=[shared])
        opt.step()
    assert first is not None
    return losses.detach() / first, result.weights


def test_gradnorm_raises_the_weight_of_the_slow_task_and_equalises_training_rates() -> None:
    equal_rates, _ = _slow_task_toy(EqualWeighting(["a", "b"]))
    rates, weights = _slow_task_toy(GradNorm(["a", "b"], alpha=1.5))
    assert equal_rates[1] > 10 * equal_rates[0]  # the slow task lags under equal weighting
    assert weights[1] > 1.0 > weights[0]  # GradNorm gives it the larger weight...
    assert float(weights.sum()) == pytest.approx(2.0)
    gap = (rates[1] / rates[0]).log().abs()
    equal_gap = (equal_rates[1] / equal_rates[0]).log().abs()
    assert gap < 0.5 * equal_gap  # ...and the inverse training rates come closer
