"""The balancer interface, equal weighting and uncertainty weighting (Kendall et al. 2018)."""

from __future__ import annotations

import math

import pytest
import torch

from polytask.balancing import BALANCERS, EqualWeighting, UncertaintyWeighting, build_balancer
from polytask.balancing.engine import GramianWeightingAggregator
from polytask.errors import ConfigError
from polytask.models import build_model
from polytask.tasks import TaskSpec

TASKS = [TaskSpec("r", "regression"), TaskSpec("c", "multiclass", num_classes=3)]


def _batch():
    torch.manual_seed(0)
    model = build_model(TASKS, (4,), encoder_params={"hidden": [8]})
    x = torch.randn(10, 4)
    y = {"r": torch.randn(10), "c": torch.randint(0, 3, (10,))}
    return model, x, y


def _losses(model, x, y):
    out = model(x)
    return out, torch.stack([t.compute_loss(out.outputs[t.name], y[t.name])[0] for t in TASKS])


def test_equal_weighting_is_the_gradient_of_the_sum() -> None:
    model, x, y = _batch()
    _, losses = _losses(model, x, y)
    losses.sum().backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    _, losses = _losses(model, x, y)
    result = EqualWeighting(TASKS).backward({"r": losses[0], "c": losses[1]})
    assert result.weights.tolist() == [1.0, 1.0]
    for p, g in zip(model.parameters(), expected, strict=True):
        assert torch.allclose(p.grad, g)


def test_uncertainty_hand_case() -> None:
    u = UncertaintyWeighting(TASKS)
    with torch.no_grad():
        u.log_vars.copy_(torch.tensor([math.log(4.0), 0.0]))
    # regression: 0.5 * exp(-log 4) * 2 + 0.5 * log 4 = 0.25 + 0.693...
    # classification: 1 * exp(0) * 3 + 0 = 3
    total, weights = u.combine(torch.tensor([2.0, 3.0]), torch.tensor([True, True]))
    assert total.item() == pytest.approx(0.25 + 0.5 * math.log(4.0) + 3.0)
    assert weights.tolist() == pytest.approx([0.125, 1.0])


def test_uncertainty_optimum_is_the_loss_scale() -> None:
    # d/ds [0.5 e^{-s} L + s/2] = 0  ⇒  e^{s} = L: the learned variance matches the loss.
    u = UncertaintyWeighting(["a"])
    opt = torch.optim.SGD(u.parameters(), lr=0.5)
    for _ in range(300):
        opt.zero_grad()
        u.backward(torch.tensor([3.0]))
        opt.step()
    assert math.exp(u.log_vars.item()) == pytest.approx(3.0, rel=1e-3)


def test_absent_task_leaves_its_log_variance_alone() -> None:
    u = UncertaintyWeighting(TASKS)
    u.backward(torch.tensor([2.0, 0.0], requires_grad=True), present=torch.tensor([True, False]))
    assert u.log_vars.grad[1].item() == 0.0 and u.log_vars.grad[0].item() != 0.0


def test_uncertainty_state_round_trip() -> None:
    u = UncertaintyWeighting(TASKS, init_log_var=0.3)
    v = BALANCERS.get("uncertainty")(TASKS)
    v.load_state_dict(u.state_dict())
    assert torch.equal(v.log_vars, u.log_vars)


class _Mean(GramianWeightingAggregator):
    def weights_from_gramian(self, gramian, losses, rows=None):
        k = gramian.shape[0]
        return torch.full((k,), 1.0 / k, dtype=gramian.dtype)


@pytest.mark.parametrize("level", ["parameters", "features"])
def test_gradient_aggregator_plumbing_matches_autograd(level: str) -> None:
    """A mean weighting of the Gramian must give half the gradient of the sum on the shared
    parameters, and each head its own task's ordinary gradient."""
    model, x, y = _batch()
    _, losses = _losses(model, x, y)
    losses.sum().backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    agg = _Mean(TASKS, level=level)
    agg.attach(model)
    out, losses = _losses(model, x, y)
    result = agg.backward(losses, shared_params=model.shared_parameters(), features=out.features)
    assert result.weights.tolist() == [0.5, 0.5]
    for name, p in model.named_parameters():
        want = expected[name] / 2 if name.startswith("encoder") else expected[name]
        assert torch.allclose(p.grad, want, atol=1e-6), name


def test_gradient_aggregator_drops_absent_tasks_and_reuses_weights() -> None:
    model, x, y = _batch()
    agg = _Mean(TASKS, update_every=2)
    _, losses = _losses(model, x, y)
    result = agg.backward(
        losses, shared_params=model.shared_parameters(), present=torch.tensor([True, False])
    )
    # only one task present: its weight is 1 (mean of one), the absent one 0
    assert result.weights.tolist() == [1.0, 0.0]
    model.zero_grad()
    _, losses = _losses(model, x, y)
    reused = agg.backward(losses, shared_params=model.shared_parameters())
    # step 2 of 2 reuses the last weights; the task absent at step 1 keeps its previous weight
    # (the initial 1) instead of being frozen at 0 until the next recomputation
    assert reused.weights.tolist() == [1.0, 1.0]
    assert int(agg.steps) == 2


def test_grad_scale_multiplies_the_gradients_not_the_weights() -> None:
    """``grad_scale`` (fp16 loss scale / accumulated micro-batches) scales every written
    gradient, the balancer's own included, while the method sees the unscaled losses."""
    runs = []
    for scale in (1.0, 8.0):
        model, x, y = _batch()
        u = UncertaintyWeighting(TASKS, init_log_var=0.3)
        _, losses = _losses(model, x, y)
        result = u.backward(losses, grad_scale=scale)
        runs.append((result, [p.grad.clone() for p in [*model.parameters(), u.log_vars]]))
    (plain, grads), (scaled, scaled_grads) = runs
    assert torch.equal(plain.weights, scaled.weights) and torch.equal(plain.loss, scaled.loss)
    for g, s in zip(grads, scaled_grads, strict=True):
        torch.testing.assert_close(s, 8.0 * g)


def test_a_method_without_grad_scale_refuses_anything_but_one() -> None:
    w = torch.nn.Parameter(torch.tensor([[2.0, 5.0]]))
    gradnorm = BALANCERS.get("gradnorm")(["a", "b"])
    assert not gradnorm.supports_grad_scale and not hasattr(gradnorm, "set_grad_scale")
    with pytest.raises(ConfigError, match="does not support fp16 loss scaling"):
        gradnorm.backward(torch.stack([3 * w[0, 0], w[0, 1]]), shared_params=[w], grad_scale=2.0)
    gradnorm.backward(torch.stack([3 * w[0, 0], w[0, 1]]), shared_params=[w], grad_scale=1.0)


def test_log_losses_passes_grad_scale_to_the_inner_balancer() -> None:
    wrapped = build_balancer("equal", ["a", "b"], log_losses=True)
    assert wrapped.supports_grad_scale
    x = torch.tensor([2.0, 3.0], requires_grad=True)
    wrapped.backward(torch.stack([x[0], 100 * x[1]]), grad_scale=4.0)
    torch.testing.assert_close(x.grad, torch.tensor([4.0 / 2.0, 4.0 / 3.0]))
