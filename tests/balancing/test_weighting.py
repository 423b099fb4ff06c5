"""Loss weightings: DWA, RLW, GLS, GradNorm, IMTL-L and FAMO (hand cases, the papers'
properties, absent tasks, robustness, checkpoint round trips and a real training step)."""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Iterator

import pytest
import torch
from torch import Tensor, nn

from polytask.balancing import BALANCERS, EqualWeighting
from polytask.balancing.base import Balancer, LossWeighting
from polytask.balancing.weighting import (
    FAMO,
    IMTLL,
    DynamicWeightAverage,
    GeometricLossStrategy,
    GradNorm,
    RandomLossWeighting,
    _step_seed,
    masked_softmax,
)
from polytask.errors import ConfigError
from polytask.models import build_model
from polytask.tasks import TaskSpec

METHODS = ["dwa", "rlw", "gls", "gradnorm", "imtl_l", "famo"]
STATEFUL = ["dwa", "rlw", "gradnorm", "imtl_l", "famo"]
TASKS = [
    TaskSpec("r", "regression"),
    TaskSpec("c", "multiclass", num_classes=3),
    TaskSpec("b", "binary"),
]
ALL = torch.tensor([True, True])


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny tensors: one thread avoids the thread pool's overhead on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _build(name: str, tasks: list[TaskSpec] | list[str], **params: object) -> Balancer:
    return BALANCERS.get(name)(tasks, **params)  # type: ignore[no-any-return]


# --------------------------------------------------------------------------- registry
def test_methods_are_registered_with_a_description() -> None:
    entries = {e.name: e for e in BALANCERS}
    for name in METHODS:
        assert name in entries
        assert entries[name].description
    assert BALANCERS.get("gradnorm").needs_shared_params
    for name in ("dwa", "rlw", "gls", "imtl_l", "famo"):
        assert issubclass(BALANCERS.get(name), LossWeighting)
        assert not BALANCERS.get(name).needs_shared_params


@pytest.mark.parametrize(
    ("name", "params", "fragment"),
    [
        ("dwa", {"window": 0}, "window must be an integer >= 1, found 0"),
        ("dwa", {"temperature": -1.0}, "temperature must be > 0, found -1.0"),
        ("rlw", {"distribution": "cauchy"}, "found 'cauchy'"),
        ("gradnorm", {"alpha": -0.5}, "alpha must be >= 0, found -0.5"),
        ("famo", {"beta": 0.0}, "beta must be > 0, found 0.0"),
        ("famo", {"gamma": -1.0}, "gamma must be >= 0, found -1.0"),
    ],
)
def test_bad_hyper_parameters_are_named(name: str, params: dict, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(")):
        _build(name, ["a", "b"], **params)


def test_masked_softmax_ignores_absent_and_infinite_logits() -> None:
    out = masked_softmax(torch.tensor([0.0, 100.0, math.log(3.0)]), torch.tensor([1, 0, 1]) > 0)
    # exp(0) : exp(ln 3) = 1 : 3 over the present tasks
    assert out.tolist() == pytest.approx([0.25, 0.0, 0.75])
    big = masked_softmax(torch.tensor([math.inf, 1.0]), ALL)
    assert torch.isfinite(big).all() and big.tolist() == pytest.approx([1.0, 0.0])
    assert masked_softmax(torch.zeros(3), torch.zeros(3, dtype=torch.bool)).tolist() == [0.0] * 3


# --------------------------------------------------------------------------- DWA
def test_dwa_hand_case_with_absent_tasks() -> None:
    dwa = DynamicWeightAverage(["a", "b", "c"], window=2, temperature=2.0)
    t, f = True, False
    calls = [
        ([2.0, 4.0, 1.0], [t, t, t]),
        ([4.0, 2.0, 0.0], [t, t, f]),  # window 1: a = (2+4)/2 = 3, b = 3, c = 1/1 = 1
        ([1.0, 1.0, 1.0], [t, t, t]),
        ([1.0, 2.0, 0.0], [t, t, f]),  # window 2: a = 1, b = 1.5, c = 1
    ]
    for losses, present in calls:  # first two windows: weight 1 on every present task
        total, w = dwa.combine(torch.tensor(losses), torch.tensor(present))
        assert w.tolist() == [1.0 if p else 0.0 for p in present]
        assert float(total) == pytest.approx(
            sum(v for v, p in zip(losses, present, strict=True) if p)
        )
    assert dwa.averages.tolist() == [[3.0, 3.0, 1.0], [1.0, 1.5, 1.0]]
    # r = (1/3, 1.5/3, 1/1) = (1/3, 1/2, 1); logits r / T = (1/6, 1/4, 1/2)
    e = [math.exp(1 / 6), math.exp(1 / 4), math.exp(1 / 2)]
    _, w = dwa.combine(torch.tensor([1.0, 1.0, 1.0]), torch.tensor([t, t, t]))
    assert w.tolist() == pytest.approx([3 * v / sum(e) for v in e], rel=1e-6)
    # b absent: the softmax runs over a and c and K counts the 2 present tasks
    total, w = dwa.combine(torch.tensor([2.0, 0.0, 1.0]), torch.tensor([t, f, t]))
    expected = [2 * e[0] / (e[0] + e[2]), 0.0, 2 * e[2] / (e[0] + e[2])]
    assert w.tolist() == pytest.approx(expected, rel=1e-6)
    assert float(total) == pytest.approx(2 * expected[0] + expected[2], rel=1e-6)
    assert int(dwa.windows) == 3 and int(dwa.steps) == 6


def test_dwa_task_absent_for_a_whole_window_keeps_its_average() -> None:
    dwa = DynamicWeightAverage(["a", "b"], window=1)
    dwa.combine(torch.tensor([2.0, 5.0]), ALL)
    dwa.combine(torch.tensor([1.0, 0.0]), torch.tensor([True, False]))
    assert dwa.averages.tolist() == [[2.0, 5.0], [1.0, 5.0]]  # b: 5 carried, ratio 1
    assert dwa.ratios().tolist() == [0.5, 1.0]


def test_dwa_favours_the_task_whose_loss_decreases_least() -> None:
    # the paper's property: w_k grows with r_k = L_k(t-1) / L_k(t-2)
    dwa = DynamicWeightAverage(["fast", "slow"], window=5)
    for step in range(30):
        losses = torch.tensor([0.8**step, 0.99**step])
        _, w = dwa.combine(losses, ALL)
    assert w[1] > 1.0 > w[0]
    assert float(w.sum()) == pytest.approx(2.0)
    # temperature → ∞: equal weights
    flat = DynamicWeightAverage(["fast", "slow"], window=5, temperature=1e6)
    for step in range(30):
        _, w = flat.combine(torch.tensor([0.8**step, 0.99**step]), ALL)
    assert w.tolist() == pytest.approx([1.0, 1.0], abs=1e-5)


# --------------------------------------------------------------------------- RLW
def test_rlw_hand_case_softmax_of_the_draws() -> None:
    class Fixed(RandomLossWeighting):
        def draws(self, device: torch.device | str = "cpu") -> Tensor:
            return torch.tensor([0.0, math.log(3.0), 5.0])

    rlw = Fixed(["a", "b", "c"])
    # softmax over the present (a, b): e^0 : e^{ln 3} = 1 : 3 ⇒ (1/4, 3/4); c absent ⇒ 0
    total, w = rlw.combine(torch.tensor([4.0, 8.0, 100.0]), torch.tensor([True, True, False]))
    assert w.tolist() == pytest.approx([0.25, 0.75, 0.0])
    assert float(total) == pytest.approx(0.25 * 4 + 0.75 * 8)  # = 7


def test_rlw_draws_are_seeded_per_step() -> None:
    rlw = RandomLossWeighting(["a", "b", "c"], seed=7)
    expected = torch.randn(3, generator=torch.Generator().manual_seed(_step_seed(7, 0)))
    _, w = rlw.combine(torch.ones(3), torch.ones(3, dtype=torch.bool))
    assert torch.allclose(w, expected.softmax(0))
    assert int(rlw.steps) == 1
    same = RandomLossWeighting(["a", "b", "c"], seed=7)
    other = RandomLossWeighting(["a", "b", "c"], seed=8)
    present = torch.ones(3, dtype=torch.bool)
    assert torch.equal(same.combine(torch.ones(3), present)[1], w)
    assert not torch.equal(other.combine(torch.ones(3), present)[1], w)


@pytest.mark.parametrize("distribution", ["normal", "uniform"])
def test_rlw_weights_are_random_points_of_the_simplex_with_mean_one_over_k(
    distribution: str,
) -> None:
    rlw = RandomLossWeighting(["a", "b", "c", "d"], distribution=distribution)
    present = torch.ones(4, dtype=torch.bool)
    draws = []
    for _ in range(2000):
        raw = rlw.draws()
        if distribution == "uniform":
            assert bool(((raw >= 0) & (raw < 1)).all())
        _, w = rlw.combine(torch.ones(4), present)
        draws.append(w)
    weights = torch.stack(draws)
    assert torch.allclose(weights.sum(1), torch.ones(2000))
    assert bool((weights > 0).all())
    # E[softmax(λ̃)] = 1/K by symmetry; the weights do vary from step to step
    assert weights.mean(0).tolist() == pytest.approx([0.25] * 4, abs=0.01)
    assert float(weights.std(0).min()) > 0.02


# --------------------------------------------------------------------------- GLS
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


# --------------------------------------------------------------------------- GradNorm
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


# --------------------------------------------------------------------------- IMTL-L
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


# --------------------------------------------------------------------------- FAMO
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


# --------------------------------------------------------------------------- shared checks
def _toy_losses(shared: Tensor, scales: Tensor, directions: Tensor) -> Tensor:
    """K losses ``s_k (1 + (Σ_rows W · d_k)²)``: scale from s_k, zero gradient where d_k = 0."""
    return scales * (1.0 + (shared.sum(0) @ directions) ** 2)


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("k", [1, 2, 40])
def test_robust_to_scales_zeros_duplicates_and_absent_tasks(name: str, k: int) -> None:
    g = torch.Generator().manual_seed(k)
    balancer = _build(name, [f"t{i}" for i in range(k)])
    shared = nn.Parameter(torch.randn(3, 5, generator=g))
    directions = torch.randn(5, k, generator=g)
    directions[:, : k // 2] = directions[:, :1]  # duplicate tasks
    directions[:, -1] = 0.0  # a task with a zero gradient
    opt = torch.optim.SGD([shared, *balancer.parameters()], lr=1e-3)
    for step in range(6):
        scales = 10.0 ** (8 * torch.rand(k, generator=g) - 4)  # 1e-4 .. 1e4
        if k > 1:
            scales[0] = 0.0  # a zero loss
        present = torch.rand(k, generator=g) > 0.3
        if step == 3:
            present[:] = False  # nothing labelled this step
        if step == 4:
            present[:] = True
        losses = _toy_losses(shared, scales, directions) * present
        opt.zero_grad()
        result = balancer.backward(losses, shared_params=[shared], present=present)
        assert torch.isfinite(result.weights).all(), (name, step)
        assert torch.isfinite(result.loss)
        assert bool((result.weights[~present] == 0).all())
        assert shared.grad is not None and torch.isfinite(shared.grad).all()
        opt.step()
        assert all(torch.isfinite(p).all() for p in balancer.parameters())


def _resume_run(balancer: Balancer, shared: nn.Parameter, first: int, steps: int) -> list[Tensor]:
    """Steps ``first .. first+steps-1`` of a deterministic toy run (data drawn from the step
    index), SGD on the shared tensor and the balancer's parameters; returns the weights."""
    opt = torch.optim.SGD([shared, *balancer.parameters()], lr=1e-2)
    out = []
    for step in range(first, first + steps):
        g = torch.Generator().manual_seed(1000 + step)
        scales = torch.rand(3, generator=g) + 0.5
        directions = torch.randn(5, 3, generator=g)
        present = torch.rand(3, generator=g) > 0.25
        losses = _toy_losses(shared, scales, directions) * present
        opt.zero_grad()
        out.append(balancer.backward(losses, shared_params=[shared], present=present).weights)
        opt.step()
    return out


@pytest.mark.parametrize("name", STATEFUL)
def test_resume_from_state_dict_gives_identical_weights(name: str) -> None:
    params: dict[str, object] = {"window": 3} if name == "dwa" else {}
    balancer = _build(name, ["a", "b", "c"], **params)
    shared = nn.Parameter(torch.randn(3, 5, generator=torch.Generator().manual_seed(0)))
    _resume_run(balancer, shared, 0, 7)
    saved = copy.deepcopy(balancer.state_dict())
    saved_shared = shared.detach().clone()
    expected = _resume_run(balancer, shared, 7, 8)

    fresh = _build(name, ["a", "b", "c"], **params)
    fresh.load_state_dict(saved)
    resumed_shared = nn.Parameter(saved_shared)
    got = _resume_run(fresh, resumed_shared, 7, 8)
    for a, b in zip(expected, got, strict=True):
        assert torch.equal(a, b), name
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, balancer.state_dict()[key]), key


@pytest.mark.parametrize("name", STATEFUL)
def test_state_is_in_the_state_dict(name: str) -> None:
    keys = set(_build(name, ["a", "b"]).state_dict())
    expected = {
        "dwa": {"steps", "windows", "window_sum", "window_count", "averages"},
        "rlw": {"steps"},
        "gradnorm": {"weights", "initial_losses", "has_initial"},
        "imtl_l": {"log_scales"},
        "famo": {"logits", "previous_losses", "previous_present"},
    }[name]
    assert keys == expected


def _real_batch(missing: str | None) -> tuple[nn.Module, dict[str, Tensor]]:
    torch.manual_seed(0)
    model = build_model(TASKS, (4,), encoder_params={"hidden": [8]})
    x = torch.randn(12, 4)
    y = {"r": torch.randn(12), "c": torch.randint(0, 3, (12,)), "b": torch.rand(12).round()}
    if missing is not None:  # no labelled sample for this task in the batch
        y[missing] = torch.full_like(y[missing], -1 if missing == "c" else math.nan)
    out = model(x)
    losses = {t.name: t.compute_loss(out.outputs[t.name], y[t.name])[0] for t in TASKS}
    return model, losses


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("missing", [None, "c"])
def test_real_training_step(name: str, missing: str | None) -> None:
    balancer = _build(name, TASKS)
    for _ in range(2):  # the second call exercises the methods' state
        model, losses = _real_batch(missing)
        balancer.attach(model)
        present = torch.tensor([missing != t.name for t in TASKS])
        result = balancer.backward(losses, shared_params=model.shared_parameters(), present=present)
        for p in model.parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all()
        assert result.weights.shape == (3,)
        assert torch.isfinite(result.weights).all()
        if missing is not None:
            assert float(result.weights[1]) == 0.0
            head = model.heads["c"]  # type: ignore[index]
            assert all(float(p.grad.abs().sum()) == 0.0 for p in head.parameters())


def test_methods_weight_like_equal_weighting_when_nothing_differs() -> None:
    """At their initial state, with equal losses, DWA and IMTL-L weight every task 1; GLS and
    FAMO give 1/K each (their weights sum to 1)."""
    losses = torch.tensor([2.0, 2.0, 2.0])
    present = torch.ones(3, dtype=torch.bool)
    for name in ("dwa", "imtl_l"):
        balancer = _build(name, list("abc"))
        assert isinstance(balancer, LossWeighting)
        assert balancer.combine(losses, present)[1].tolist() == [1.0, 1.0, 1.0]
    gls = GeometricLossStrategy(list("abc")).combine(losses, present)[1]
    assert gls.tolist() == pytest.approx([1 / 3] * 3)  # geometric mean: ∂/∂L_k = 1/K
    famo = FAMO(list("abc")).combine(losses, present)[1]
    assert famo.tolist() == pytest.approx([1 / 3] * 3)
