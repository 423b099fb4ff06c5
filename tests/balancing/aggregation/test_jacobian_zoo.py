"""Shared properties of the gradient aggregators over a zoo of Jacobians (agreeing, orthogonal,
opposed with cosine < -0.9, a zero row, duplicate rows, norms from 1e-4 to 1e4, random; K = 1, 2,
5, 40; P = 50), through ``aggregate``: finite output with the right shapes and dtype,
``weights @ J == update`` for the methods whose update is linear in J, permutation invariance
(all but the methods whose task order is random), and the mean direction when every task agrees
(with the exact factor where the method fixes it)."""

from __future__ import annotations

import itertools

import pytest
import torch
from tiny_steps import ZOO_KINDS, zoo_jacobian
from torch import Tensor

from polytask.balancing import BALANCERS, GradientAggregator

P = 50
#: the methods of each zoo, with the seed base of its Jacobians: the projection and min-norm
#: methods, then the bargaining, alignment, EMA and sign-dropout ones
SEED_BASE = {
    **dict.fromkeys(["mgda", "mgda_ub", "pcgrad", "cagrad", "upgrad", "dualproj", "imtl_g"], 1000),
    **dict.fromkeys(["nash_mtl", "aligned_mtl", "gradvac", "graddrop", "db_mtl", "fairgrad"], 77),
}
METHODS = list(SEED_BASE)
#: PCGrad and GradVac visit the tasks in a random order; GradDrop is random too, but its draws
#: are per coordinate, not per task, so two fresh instances with one seed agree on permuted rows
PERMUTATION_INVARIANT = [m for m in METHODS if m not in ("pcgrad", "gradvac")]
#: methods whose weights follow their tasks under a permutation (checked beyond the update)
WEIGHTS_FOLLOW_TASKS = ["nash_mtl", "aligned_mtl", "graddrop", "db_mtl", "fairgrad"]
#: methods whose update is exactly ``weights @ J``
LINEAR = [m for m in METHODS if m not in ("graddrop", "db_mtl")]
#: the positive multiple of the mean a method returns when every task has the same gradient
AGREEING_SCALE = {
    "mgda": lambda k: 1.0,
    "mgda_ub": lambda k: 1.0,
    "pcgrad": lambda k: float(k),  # reduction="sum"
    "cagrad": lambda k: (1 + 0.4) / (1 + 0.4**2),  # (1 + c) / (1 + c²), rescale=1
    "upgrad": lambda k: 1.0,
    "dualproj": lambda k: 1.0,
    "imtl_g": lambda k: 1.0,
}


def zoo(name: str, kind: str, k: int) -> Tensor:
    """A K×P float64 Jacobian of the given kind."""
    return zoo_jacobian(kind, k, p=P, seed=SEED_BASE[name] * k)


def _build(name: str, k: int) -> torch.nn.Module:
    return BALANCERS.get(name)([f"t{i}" for i in range(k)])


@pytest.mark.parametrize(
    ("name", "kind", "k"), list(itertools.product(METHODS, ZOO_KINDS, [1, 2, 5, 40]))
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_finite_with_the_right_shapes(name: str, kind: str, k: int, dtype: torch.dtype) -> None:
    j = zoo(name, kind, k).to(dtype)
    agg = _build(name, k)
    for _ in range(2):  # a second call exercises the stateful methods' EMAs
        update, weights = agg.aggregate(j, torch.ones(k, dtype=dtype))
        assert update.shape == (P,) and weights.shape == (k,)
        assert update.dtype == dtype and weights.dtype == dtype
        assert torch.isfinite(update).all() and torch.isfinite(weights).all()
    if name in LINEAR:
        scale = float(j.abs().max()) * max(float(weights.abs().max()), 1.0)
        torch.testing.assert_close(weights @ j, update, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize(
    ("name", "kind", "k"), list(itertools.product(PERMUTATION_INVARIANT, ZOO_KINDS, [2, 5, 40]))
)
def test_permutation_invariant(name: str, kind: str, k: int) -> None:
    j = zoo(name, kind, k)
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(k))
    update, weights = _build(name, k).aggregate(j, torch.ones(k, dtype=j.dtype))
    permuted, permuted_weights = _build(name, k).aggregate(j[perm], torch.ones(k, dtype=j.dtype))
    scale = float(j.norm(dim=1).max()) * max(float(weights.abs().max()), 1.0)
    torch.testing.assert_close(permuted, update, rtol=1e-6, atol=1e-7 * scale)
    if name in WEIGHTS_FOLLOW_TASKS and kind != "norms":  # (with norms spanning 8 orders of
        # magnitude, Aligned-MTL's rank cut falls on eigenvalues at rounding level, so the
        # weights of the tiniest rows may differ while the update does not)
        torch.testing.assert_close(permuted_weights, weights[perm], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize(("name", "k"), list(itertools.product(METHODS, [1, 2, 5, 40])))
def test_a_positive_multiple_of_the_mean_when_tasks_agree(name: str, k: int) -> None:
    j = zoo(name, "agreeing", k)
    mean = j.mean(0)
    update, _ = _build(name, k).aggregate(j, torch.ones(k, dtype=j.dtype))
    factor = float(update @ mean / (mean @ mean))
    assert factor > 0
    if name in AGREEING_SCALE:
        factor = AGREEING_SCALE[name](k)
    torch.testing.assert_close(update, factor * mean)


def test_the_zoo_covers_every_gradient_method() -> None:
    gradient = {n for n in BALANCERS.names() if issubclass(BALANCERS.get(n), GradientAggregator)}
    assert gradient == set(METHODS)
