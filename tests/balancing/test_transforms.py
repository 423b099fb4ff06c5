"""The log-loss transform of DB-MTL (``LogLosses``) and ``build_balancer``."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
from torch import Tensor, nn

from polytask.balancing import BALANCERS, Balancer, EqualWeighting, UncertaintyWeighting
from polytask.balancing.engine import GramianWeightingAggregator
from polytask.balancing.transforms import LogLosses, build_balancer, log_transform
from polytask.balancing.weighting import RandomLossWeighting
from polytask.errors import ConfigError, UnknownNameError
from polytask.models import build_model
from polytask.tasks import TaskSpec

MINE = ["dwa", "rlw", "gls", "gradnorm", "imtl_l", "famo"]
POSITIVE = ["dwa", "gls", "gradnorm", "imtl_l", "famo"]
TASKS = [TaskSpec("r", "regression"), TaskSpec("c", "multiclass", num_classes=3)]


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class UnitNormGradients(GramianWeightingAggregator):
    """A tiny Gramian weighting for the tests: w_k = 1 / ||g_k|| (sums unit-norm gradients)."""

    def weights_from_gramian(
        self, gramian: Tensor, losses: Tensor, rows: Tensor | None = None
    ) -> Tensor:
        return 1.0 / gramian.diagonal().clamp_min(1e-24).sqrt()


# --------------------------------------------------------------------------- the transform
def test_log_transform_of_present_tasks_only() -> None:
    losses = torch.tensor([1.0, math.e, 5.0, 0.0], requires_grad=True)
    present = torch.tensor([True, True, False, True])
    out = log_transform(losses, present, eps=1e-8)
    # log(1 + ε) ≈ 0, log(e + ε) ≈ 1, absent → exactly 0, log(0 + 1e-8) = -18.42
    assert out.detach().tolist()[:3] == pytest.approx([0.0, 1.0, 0.0], abs=1e-6)
    assert float(out.detach()[2]) == 0.0
    assert float(out.detach()[3]) == pytest.approx(math.log(1e-8))
    out.sum().backward()
    # d/dL log(L + ε) = 1 / (L + ε); the absent task gets no gradient
    assert losses.grad is not None
    assert losses.grad.tolist()[:3] == pytest.approx([1.0, 1 / math.e, 0.0])
    assert torch.isfinite(losses.grad).all()


def test_log_losses_with_equal_weighting_is_the_gradient_of_the_summed_logs() -> None:
    theta = torch.tensor([0.5, -2.0, 3.0], requires_grad=True)

    def losses() -> Tensor:
        return torch.stack(
            [(theta**2).sum(), 100 * (theta[0] - 1) ** 2, (theta[2] + theta[1]) ** 4]
        )

    present = torch.tensor([True, True, False])
    result = LogLosses(EqualWeighting(["a", "b", "c"]), eps=1e-8).backward(
        losses(), present=present
    )
    got = theta.grad.clone()  # type: ignore[union-attr]
    # by hand: L_a = 0.25 + 4 + 9 = 13.25, ∇L_a = 2θ = (1, -4, 6)
    #          L_b = 100 * 0.25 = 25,     ∇L_b = (200 (θ0 - 1), 0, 0) = (-100, 0, 0)
    #          ∇ [log L_a + log L_b] = (1/13.25 - 100/25, -4/13.25, 6/13.25); c absent
    expected = torch.tensor([1 / 13.25 - 4.0, -4 / 13.25, 6 / 13.25])
    assert torch.allclose(got, expected, atol=1e-6)
    assert result.weights.tolist() == [1.0, 1.0, 0.0]
    assert float(result.loss) == pytest.approx(math.log(13.25) + math.log(25.0), rel=1e-6)
    theta.grad = None
    torch.stack([torch.log(v + 1e-8) for v in losses()[:2]]).sum().backward()
    assert torch.allclose(got, theta.grad)  # type: ignore[arg-type]


def test_log_losses_with_a_gramian_weighting_sees_the_jacobian_of_the_logs() -> None:
    shared = nn.Parameter(torch.tensor([1.0, 2.0]))
    head = nn.Parameter(torch.tensor(3.0))
    inner = UnitNormGradients(["a", "b"])
    wrapped = LogLosses(inner)
    assert wrapped.needs_shared_params and not wrapped.needs_features
    losses = torch.stack([10 * shared[0] ** 2 * head, shared[1] ** 2])
    result = wrapped.backward(losses, shared_params=[shared])
    # log-losses: log(10 x² h) and log(y²); ∇_shared = (2/x, 0) = (2, 0) and (0, 2/y) = (0, 1)
    # unit-norm weights: 1/2 and 1/1 ⇒ update = (1, 0) + (0, 1) = (1, 1), whatever the 10
    assert result.weights.tolist() == pytest.approx([0.5, 1.0])
    assert shared.grad is not None and shared.grad.tolist() == pytest.approx([1.0, 1.0])
    # the head gets the plain gradient of its own (log) loss: d/dh log(10 x² h) = 1/h
    assert head.grad is not None and float(head.grad) == pytest.approx(1 / 3)
    features = LogLosses(UnitNormGradients(["a", "b"], level="features"))
    assert features.needs_features and not features.needs_shared_params


class _Scaled(EqualWeighting):
    """Equal weighting times a learnable factor: a parameter-holding inner balancer that accepts
    losses of any sign (uncertainty weighting does not: LogLosses refuses it)."""

    def __init__(self, tasks) -> None:
        super().__init__(tasks)
        self.scale = nn.Parameter(torch.ones(()))

    def combine(self, losses, present):
        total, weights = super().combine(losses, present)
        return self.scale * total, weights


def test_log_losses_forwards_attach_parameters_and_state() -> None:
    inner = _Scaled(TASKS)
    wrapped = LogLosses(inner)
    assert [id(p) for p in wrapped.parameters()] == [id(inner.scale)]
    assert set(wrapped.state_dict()) == {"inner.scale"}
    with torch.no_grad():
        inner.scale.fill_(0.7)
    other = LogLosses(_Scaled(TASKS))
    other.load_state_dict(wrapped.state_dict())
    assert torch.equal(other.inner.scale, inner.scale)  # type: ignore[union-attr]
    with pytest.raises(ConfigError, match="cannot wrap UncertaintyWeighting"):
        LogLosses(UncertaintyWeighting(TASKS))

    calls = []

    class Spy(EqualWeighting):
        def attach(self, model: nn.Module) -> None:
            calls.append(model)

    model = nn.Linear(2, 2)
    LogLosses(Spy(["a"])).attach(model)
    assert calls == [model]
    with pytest.raises(ConfigError, match=r"eps must be > 0, found 0\.0"):
        LogLosses(EqualWeighting(["a"]), eps=0.0)
    with pytest.raises(TypeError, match="inner must be a Balancer"):
        LogLosses("equal")  # type: ignore[arg-type]


def test_log_losses_all_absent_gives_zero() -> None:
    x = torch.tensor(2.0, requires_grad=True)
    result = LogLosses(EqualWeighting(["a", "b"])).backward(
        torch.stack([x, x * 0]), present=torch.tensor([False, False])
    )
    assert float(result.loss) == 0.0 and result.weights.tolist() == [0.0, 0.0]
    assert x.grad is not None and float(x.grad) == 0.0


# --------------------------------------------------------------------------- build_balancer
def test_build_balancer_validates_and_wraps() -> None:
    b = build_balancer("dwa", TASKS, params={"window": 10, "temperature": 1.0})
    assert type(b).__name__ == "DynamicWeightAverage" and b.window == 10  # type: ignore[attr-defined]
    wrapped = build_balancer("rlw", TASKS, params={"seed": 3}, log_losses=True)
    assert isinstance(wrapped, LogLosses) and isinstance(wrapped.inner, RandomLossWeighting)
    assert not wrapped.needs_shared_params
    with pytest.raises(UnknownNameError, match="unknown balancing method 'nope'; known: "):
        build_balancer("nope", TASKS)
    with pytest.raises(ConfigError, match="unknown parameter 'windows' for balancing method 'dwa'"):
        build_balancer("dwa", TASKS, params={"windows": 3})
    with pytest.raises(ConfigError, match="temperature must be > 0"):
        build_balancer("dwa", TASKS, params={"temperature": 0.0})


@pytest.mark.parametrize("name", POSITIVE)
def test_methods_needing_positive_losses_refuse_the_log_transform(name: str) -> None:
    # e.g. GLS of log-losses below 0 would clamp them and silently drop their gradient
    assert BALANCERS.get(name).requires_positive_losses
    with pytest.raises(ConfigError, match=r"cannot wrap .* must be positive"):
        build_balancer(name, TASKS, log_losses=True)


@pytest.mark.parametrize(
    ("name", "log_losses"),
    [(name, False) for name in ["equal", "uncertainty", *MINE]]
    + [("equal", True), ("rlw", True), ("unit_norm_test", True)],
)
def test_built_balancers_train_a_real_model(name: str, log_losses: bool) -> None:
    torch.manual_seed(0)
    if name == "unit_norm_test":  # a gradient method, built here (not registered)
        balancer: Balancer = LogLosses(UnitNormGradients(TASKS))
    else:
        balancer = build_balancer(name, TASKS, params={}, log_losses=log_losses)
    model = build_model(TASKS, (4,), encoder_params={"hidden": [8]})
    balancer.attach(model)
    opt = torch.optim.SGD([*model.parameters(), *balancer.parameters()], lr=0.01)
    for step in range(3):
        x = torch.randn(10, 4)
        y = {"r": torch.randn(10), "c": torch.randint(0, 3, (10,))}
        if step == 1:
            y["r"] = torch.full((10,), math.nan)  # r absent this step
        out = model(x)
        pairs = [t.compute_loss(out.outputs[t.name], y[t.name]) for t in TASKS]
        losses = {t.name: loss for t, (loss, _) in zip(TASKS, pairs, strict=True)}
        present = torch.stack([count for _, count in pairs]) > 0
        opt.zero_grad()
        result = balancer.backward(
            losses,
            shared_params=model.shared_parameters() if balancer.needs_shared_params else None,
            present=present,
        )
        for p in model.parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), (name, step)
        assert torch.isfinite(result.weights).all()
        if step == 1 and name != "uncertainty":  # it reports its weights for absent tasks too
            assert float(result.weights[0]) == 0.0
        opt.step()


def test_every_registered_method_is_buildable_by_name() -> None:
    for entry in BALANCERS:
        required = [k for k, p in BALANCERS.parameters(entry.name).items() if p.default is p.empty]
        if required:  # a method without defaults for everything is not built blindly
            continue
        positive = getattr(entry.builder, "requires_positive_losses", False)
        assert isinstance(build_balancer(entry.name, TASKS), Balancer)
        if not positive:
            assert isinstance(build_balancer(entry.name, TASKS, log_losses=True), LogLosses)
