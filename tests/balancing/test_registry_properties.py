"""One property suite over EVERY method registered in ``BALANCERS``: a new method is tested for
free, with no edit here unless it needs an exception (the table below, with the reason).

Through the public ``Balancer.backward`` on a real tiny model (an MLP trunk, three heads of
different kinds, ``present`` masks): finite weights and loss, every parameter (the model's and
the balancer's own) gets a finite ``.grad``; a task marked absent gets weight 0 and changes
nothing, its head gets no gradient from its loss even when that loss is not 0; a ``state_dict``
round trip through a safetensors checkpoint resumes with bit-identical updates. Through
``GradientAggregator.aggregate`` on a zoo of Jacobians (agreeing, orthogonal, opposed with cosine
< -0.9, a zero row, duplicate rows, norms from 1e-4 to 1e4; K = 2, 5, 40): finite output with the
right shapes, ``weights @ J == update`` for Gramian weightings, permutation invariance and the
common direction when every task agrees. And the catalogue: ``polytask methods`` lists the
method with a description that dates a paper, and its docstring cites one.
"""

from __future__ import annotations

import copy
import inspect
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor
from typer.testing import CliRunner

from polytask.balancing import BALANCERS, Balancer, BalanceResult, build_balancer
from polytask.balancing.engine import GradientAggregator, GramianWeightingAggregator
from polytask.cli import app
from polytask.models import build_model
from polytask.models.architectures import MultiTaskModel
from polytask.tasks import TaskSpec
from polytask.train.checkpoint import load_checkpoint, save_checkpoint

# --------------------------------------------------------------------------- exceptions
#: property -> {method: why the method does not have it}. Everything not listed must pass.
EXCEPTIONS: dict[str, dict[str, str]] = {
    "permutation_invariant": {
        "pcgrad": "each task's projection order is drawn at random: permuting the rows changes "
        "which order each task gets",
        "gradvac": "each task visits the others in a random order (as PCGrad)",
    },
    "cites_a_paper": {
        "equal": "the baseline: no paper to cite",
    },
}

#: property -> {method: the bug}: run as strict xfails, so a fix makes the suite say "remove me"
KNOWN_BUGS: dict[str, dict[str, str]] = {
    "absent_weight_zero": {},
    "grads_without_attach": {},
}

#: constructor parameters that make a method's state matter within the few steps of a test
#: (the defaults would leave it inert): DWA's first adaptive weights need two full windows
STATEFUL_PARAMS: dict[str, dict[str, Any]] = {"dwa": {"window": 1}}

YEAR = re.compile(r"\b(19|20)\d{2}\b")
ALL = BALANCERS.names()
GRADIENT = [n for n in ALL if issubclass(BALANCERS.get(n), GradientAggregator)]
GRAMIAN = [n for n in ALL if issubclass(BALANCERS.get(n), GramianWeightingAggregator)]


def _has(prop: str, name: str) -> bool:
    return name not in EXCEPTIONS.get(prop, {})


def test_the_catalogue_is_complete() -> None:
    """The 21 methods docs/balancing.md documents are all registered (the suite below runs over
    whatever is)."""
    expected = {
        "equal", "uncertainty", "dwa", "rlw", "gls", "gradnorm", "imtl_l", "famo",
        "mgda", "mgda_ub", "pcgrad", "cagrad", "nash_mtl", "imtl_g", "aligned_mtl", "upgrad",
        "dualproj", "gradvac", "graddrop", "db_mtl", "fairgrad",
    }  # fmt: skip
    assert expected <= set(ALL), sorted(expected - set(ALL))
    for table in [*EXCEPTIONS.values(), *KNOWN_BUGS.values()]:  # no stale entry
        assert set(table) <= set(ALL), sorted(set(table) - set(ALL))


# --------------------------------------------------------------------------- a tiny model
TASKS = [
    TaskSpec("r", "regression"),
    TaskSpec("c", "multiclass", num_classes=4),
    TaskSpec("b", "binary"),
]
ABSENT = 1  # the task made absent in the tests of absent tasks ("c")
BATCH = 12


def _model(seed: int = 0) -> MultiTaskModel:
    torch.manual_seed(seed)
    return build_model(TASKS, (6,), encoder_params={"hidden": [8, 8]})


def _batch(step: int) -> tuple[Tensor, dict[str, Tensor]]:
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(BATCH, 6, generator=g)
    y = {
        "r": torch.randn(BATCH, generator=g),
        "c": torch.randint(0, 4, (BATCH,), generator=g),
        "b": torch.randint(0, 2, (BATCH,), generator=g).float(),
    }
    return x, y


def _unlabelled(y: dict[str, Tensor], name: str) -> dict[str, Tensor]:
    """``y`` with every label of task ``name`` missing (-1 for multiclass, NaN otherwise)."""
    out = dict(y)
    out[name] = torch.full_like(y[name], -1) if name == "c" else torch.full_like(y[name], torch.nan)
    return out


def _build(name: str, **params: Any) -> Balancer:
    return build_balancer(name, TASKS, params=params)


def _step(
    model: MultiTaskModel,
    balancer: Balancer,
    x: Tensor,
    y: dict[str, Tensor],
    present: Tensor | None = None,
) -> BalanceResult:
    """One backward as a plain loop does it (grads cleared first, nothing stepped)."""
    model.zero_grad(set_to_none=True)
    balancer.zero_grad(set_to_none=True)
    out = model(x)
    losses = {t.name: t.compute_loss(out.outputs[t.name], y[t.name])[0] for t in TASKS}
    return balancer.backward(
        losses, shared_params=model.shared_parameters(), features=out.features, present=present
    )


def _trainable(*modules: torch.nn.Module) -> Iterator[tuple[str, Tensor]]:
    for prefix, module in zip(("model", "balancer"), modules, strict=False):
        for n, p in module.named_parameters():
            if p.requires_grad:
                yield f"{prefix}.{n}", p


def _grads(*modules: torch.nn.Module) -> dict[str, Tensor | None]:
    return {n: None if p.grad is None else p.grad.clone() for n, p in _trainable(*modules)}


def _head_of(model: MultiTaskModel, task: str) -> list[tuple[str, Tensor]]:
    found = [(n, p) for n, p in model.named_parameters() if re.search(rf"\b{task}\b", n)]
    assert found, f"no head parameters found for task {task!r}"
    assert not {id(p) for _, p in found} & {id(p) for p in model.shared_parameters()}
    return found


# --------------------------------------------------------------------------- through backward
def _known_bug(prop: str, names: list[str]) -> list[Any]:
    return [
        pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=KNOWN_BUGS[prop][n]))
        if n in KNOWN_BUGS.get(prop, {})
        else n
        for n in names
    ]


@pytest.mark.parametrize("name", ALL)
def test_backward_gives_every_parameter_a_finite_gradient(name: str) -> None:
    model = _model()
    balancer = _build(name)
    balancer.attach(model)
    x, y = _batch(0)
    result = _step(model, balancer, x, y)
    assert result.weights.shape == (len(TASKS),)
    assert torch.isfinite(result.weights).all(), result.weights
    assert torch.isfinite(result.loss).all() and result.loss.dim() == 0
    for n, p in _trainable(model, balancer):
        assert p.grad is not None, f"{name}: {n} got no gradient"
        assert p.grad.shape == p.shape, n
        assert torch.isfinite(p.grad).all(), f"{name}: {n} has a non-finite gradient"
    shared = torch.cat([p.grad.reshape(-1) for p in model.shared_parameters()])
    assert shared.abs().sum() > 0, f"{name}: the shared update is zero"


@pytest.mark.parametrize("name", _known_bug("grads_without_attach", ALL))
def test_backward_without_attach_still_trains_every_parameter(name: str) -> None:
    """A plain loop that forgets ``attach(model)`` still trains the heads (the methods that
    need the split find it from the autograd graph)."""
    model = _model()
    result = _step(model, _build(name), *_batch(0))
    assert torch.isfinite(result.weights).all()
    for n, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), f"{name}: {n}"


def _absent_runs(name: str) -> dict[str, tuple[dict[str, Tensor | None], BalanceResult]]:
    """One step with task ``ABSENT`` marked absent, its labels either all missing (loss 0) or
    real (a non-zero loss that must be ignored); checks its head got no gradient."""
    present = torch.ones(len(TASKS), dtype=torch.bool)
    present[ABSENT] = False
    absent = TASKS[ABSENT].name
    x, y = _batch(0)
    runs = {}
    for labels in ("missing", "real"):
        model = _model()
        balancer = _build(name)
        balancer.attach(model)
        batch_y = _unlabelled(y, absent) if labels == "missing" else y
        result = _step(model, balancer, x, batch_y, present)
        assert torch.isfinite(result.weights).all(), f"{name}: weights {result.weights}"
        for n, p in _head_of(model, absent):
            assert p.grad is None or not p.grad.any(), f"{name}: absent head {n} got a gradient"
        runs[labels] = (_grads(model, balancer), result)
    return runs


@pytest.mark.parametrize("name", ALL)
def test_an_absent_task_contributes_nothing(name: str) -> None:
    """A task marked absent changes nothing, even when the loss handed over for it is not 0
    (here: computed from real labels), and its head gets no gradient from it."""
    runs = _absent_runs(name)
    (missing, r_missing), (real, r_real) = runs["missing"], runs["real"]
    torch.testing.assert_close(r_real.weights, r_missing.weights, rtol=1e-6, atol=0.0)
    for n, g in missing.items():
        if g is None or real[n] is None:
            assert g is None or not g.any(), n
            assert real[n] is None or not real[n].any(), n
        else:
            torch.testing.assert_close(real[n], g, rtol=1e-6, atol=1e-8, msg=f"{name}: {n}")


@pytest.mark.parametrize("name", _known_bug("absent_weight_zero", ALL))
def test_an_absent_task_is_reported_with_weight_zero(name: str) -> None:
    for _, result in _absent_runs(name).values():
        assert float(result.weights[ABSENT]) == 0.0, f"{name}: weights {result.weights}"


def _resume_cases() -> list[Any]:
    cases = [pytest.param(n, STATEFUL_PARAMS.get(n, {}), id=n) for n in ALL]
    # reusing the weights between recomputations is state too (``steps``, ``last_weights``)
    cases += [pytest.param(n, {"update_every": 2}, id=f"{n}-update_every=2") for n in GRAMIAN]
    return cases


@pytest.mark.parametrize(("name", "params"), _resume_cases())
def test_state_dict_round_trip_resumes_identically(
    name: str, params: dict[str, Any], tmp_path: Path
) -> None:
    """Three steps (one with a task absent), a checkpoint of the balancer's ``state_dict``
    through safetensors, then two more steps from both: the same weights and gradients."""
    model = _model()
    balancer = _build(name, **params)
    balancer.attach(model)
    optimizer = torch.optim.SGD([*model.parameters(), *balancer.parameters()], lr=0.05)
    masks = [None, torch.tensor([True, False, True]), None]
    for step, present in enumerate(masks):
        x, y = _batch(step)
        _step(model, balancer, x, y, present)
        optimizer.step()
    path = tmp_path / "balancer.safetensors"
    save_checkpoint(path, {"balancer": balancer.state_dict()})
    resumed_model = copy.deepcopy(model)
    resumed = _build(name, **params)
    resumed.attach(resumed_model)
    resumed.load_state_dict(load_checkpoint(path)["balancer"])
    for step in (3, 4):
        x, y = _batch(step)
        outputs = []
        for m, b in ((model, balancer), (resumed_model, resumed)):
            result = _step(m, b, x, y)
            outputs.append((result, _grads(m, b)))
            torch.optim.SGD([*m.parameters(), *b.parameters()], lr=0.05).step()
        (r_a, g_a), (r_b, g_b) = outputs
        assert torch.equal(r_a.weights, r_b.weights), f"{name} step {step}: weights differ"
        for n, g in g_a.items():
            assert (g is None) == (g_b[n] is None), n
            if g is not None:
                assert torch.equal(g, g_b[n]), f"{name} step {step}: {n} differs after resume"


# --------------------------------------------------------------------------- the Jacobian zoo
P = 64
KINDS = ["agreeing", "orthogonal", "opposed", "zero_row", "duplicates", "norms", "random"]
KS = [2, 5, 40]


def zoo(kind: str, k: int, seed: int = 0) -> Tensor:
    """A K×P float64 Jacobian of the given kind."""
    gen = torch.Generator().manual_seed(31 * k + seed)
    base = torch.randn(k, P, generator=gen, dtype=torch.float64)
    if kind == "agreeing":
        return base[0].repeat(k, 1)
    if kind == "orthogonal":
        q, _ = torch.linalg.qr(base.T)  # [P, K] with orthonormal columns (K <= P)
        return q.T * torch.linspace(0.5, 3.0, k, dtype=torch.float64)[:, None]
    if kind == "opposed":  # alternating signs around one direction
        signs = torch.tensor([(-1.0) ** i for i in range(k)], dtype=torch.float64)
        out = (signs * torch.linspace(1.0, 2.0, k, dtype=torch.float64))[:, None] * base[0]
        out = out + 0.05 * base
        assert float(torch.cosine_similarity(out[0], out[1], dim=0)) < -0.9
        return out
    if kind == "zero_row":
        base[k // 2] = 0.0
        return base
    if kind == "duplicates":
        base[1] = base[0]
        base[k - 1] = base[k - 2]
        return base
    if kind == "norms":
        return base * torch.logspace(-4, 4, k, dtype=torch.float64)[:, None]
    return base


def _aggregator(name: str, k: int) -> GradientAggregator:
    agg = BALANCERS.get(name)([f"t{i}" for i in range(k)])
    assert isinstance(agg, GradientAggregator)
    return agg


def _each_case() -> Iterator[tuple[str, int, Tensor]]:
    for kind in KINDS:
        for k in KS:
            yield kind, k, zoo(kind, k)


@pytest.mark.parametrize("name", GRADIENT)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_zoo_finite_with_the_right_shapes(name: str, dtype: torch.dtype) -> None:
    for kind, k, j in _each_case():
        j = j.to(dtype)
        update, weights = _aggregator(name, k).aggregate(j, torch.ones(k, dtype=dtype))
        where = f"{name} on {kind} K={k} {dtype}"
        assert update.shape == (P,) and weights.shape == (k,), where
        assert update.dtype == dtype, where
        assert torch.isfinite(update).all() and torch.isfinite(weights).all(), where
        if name in GRAMIAN:  # the update is exactly the weighting of the Jacobian
            scale = float((weights.abs().to(torch.float64) @ j.abs().to(torch.float64)).max())
            tol = (1e-12 if dtype == torch.float64 else 1e-5) * max(scale, 1e-30)
            torch.testing.assert_close(weights @ j, update, rtol=0.0, atol=tol, msg=where)


def _close(a: Tensor, b: Tensor, j: Tensor, what: str) -> None:
    """Equal up to 1e-7 relative to the size of the update and of the largest gradient."""
    scale = max(float(a.abs().max()), float(b.abs().max()), float(j.norm(dim=1).max()), 1e-300)
    torch.testing.assert_close(a, b, rtol=0.0, atol=1e-7 * scale, msg=what)


@pytest.mark.parametrize("name", [n for n in GRADIENT if _has("permutation_invariant", n)])
def test_zoo_permutation_invariant(name: str) -> None:
    for kind, k, j in _each_case():
        perm = torch.randperm(k, generator=torch.Generator().manual_seed(k))
        update, weights = _aggregator(name, k).aggregate(j, torch.ones(k, dtype=j.dtype))
        permuted, p_weights = _aggregator(name, k).aggregate(j[perm], torch.ones(k, dtype=j.dtype))
        _close(permuted, update, j, f"{name} on {kind} K={k}: update")
        if kind not in ("agreeing", "duplicates"):  # identical rows may split their weight
            # compare each task's contribution w_i·‖g_i‖: a weight on a tiny gradient is free
            norms = j[perm].norm(dim=1)
            _close(p_weights * norms, weights[perm] * norms, j, f"{name} on {kind} K={k}: weights")


def test_every_randomised_method_is_listed_as_such() -> None:
    """The exceptions to permutation invariance are real: each one fails it somewhere."""
    for name in EXCEPTIONS["permutation_invariant"]:
        differs = False
        for _, k, j in _each_case():
            perm = torch.randperm(k, generator=torch.Generator().manual_seed(k))
            update, _ = _aggregator(name, k).aggregate(j, torch.ones(k, dtype=j.dtype))
            permuted, _ = _aggregator(name, k).aggregate(j[perm], torch.ones(k, dtype=j.dtype))
            differs |= not torch.allclose(update, permuted, rtol=1e-6, atol=1e-9)
        assert differs, f"{name} is permutation invariant on the zoo: drop its exception"


@pytest.mark.parametrize("name", GRADIENT)
def test_zoo_agreeing_tasks_give_their_common_direction(name: str) -> None:
    """When every task has the same gradient g, the update is a positive multiple of g."""
    for k in KS:
        j = zoo("agreeing", k)
        update, _ = _aggregator(name, k).aggregate(j, torch.ones(k, dtype=j.dtype))
        cosine = float(torch.cosine_similarity(update, j[0], dim=0))
        assert cosine > 1 - 1e-9, f"{name} K={k}: cosine {cosine}"


# --------------------------------------------------------------------------- the catalogue
@pytest.fixture(scope="module")
def methods_listing() -> str:
    result = CliRunner().invoke(app, ["methods"], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("name", ALL)
def test_polytask_methods_lists_it_with_a_dated_description(
    name: str, methods_listing: str
) -> None:
    row = re.search(rf"│\s*balancing(?: method)?\s*│\s*{re.escape(name)}\s*│(.*)│", methods_listing)
    assert row, f"`polytask methods` does not list {name!r}"
    description = row.group(1).strip()
    if _has("cites_a_paper", name):
        assert YEAR.search(description), f"{name}: no year in {description!r}"
    else:
        assert description, name


@pytest.mark.parametrize("name", ALL)
def test_docstring_cites_a_paper(name: str) -> None:
    doc = inspect.getdoc(BALANCERS.get(name)) or ""
    assert doc, f"{name} has no docstring"
    if _has("cites_a_paper", name):
        assert YEAR.search(doc), f"{name}: the docstring cites no paper (no year)"
