"""Every loss weighting of ``weighting/``: registration and bad hyper-parameters, the masked
softmax, and shared checks (robustness to scales, zeros, duplicates and absent tasks; resuming
from ``state_dict``; a real training step; equal weights when nothing differs)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import Tensor, nn

from polytask.balancing import BALANCERS
from polytask.balancing.base import Balancer, LossWeighting
from polytask.balancing.weighting import (
    FAMO,
    GeometricLossStrategy,
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


def _build(name: str, tasks: list[TaskSpec] | list[str], **params: object) -> Balancer:
    return BALANCERS.get(name)(tasks, **params)  # type: ignore[no-any-return]


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
