"""Shared properties of Nash-MTL, Aligned-MTL, GradVac, GradDrop, DB-MTL and FairGrad over a zoo
of Jacobians (agreeing, orthogonal, opposed with cosine < -0.9, a zero row, duplicate rows, norms
from 1e-4 to 1e4; K = 1, 2, 5, 40; P = 50), through ``GradientAggregator.aggregate``: finite
output with the right shapes, permutation invariance (all but GradVac, whose task order is
random), a positive multiple of the mean when every task agrees."""

from __future__ import annotations

import itertools

import pytest
import torch
from tiny_steps import ZOO_KINDS, zoo_jacobian
from torch import Tensor

from polytask.balancing import BALANCERS

P = 50
METHODS = ["nash_mtl", "aligned_mtl", "gradvac", "graddrop", "db_mtl", "fairgrad"]
#: GradVac visits the tasks in a random order; GradDrop is random too, but its draws are per
#: coordinate, not per task, so two fresh instances with one seed agree on permuted rows
PERMUTATION_INVARIANT = [m for m in METHODS if m != "gradvac"]
#: methods whose update is exactly ``weights @ J``
LINEAR = ["nash_mtl", "aligned_mtl", "gradvac", "fairgrad"]
KINDS = ZOO_KINDS


def zoo(kind: str, k: int, seed: int = 0) -> Tensor:
    """A K×P float64 Jacobian of the given kind."""
    return zoo_jacobian(kind, k, p=P, seed=77 * k + seed)


def _build(name: str, k: int) -> torch.nn.Module:
    return BALANCERS.get(name)([f"t{i}" for i in range(k)])


@pytest.mark.parametrize(
    ("name", "kind", "k"), list(itertools.product(METHODS, KINDS, [1, 2, 5, 40]))
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_finite_with_the_right_shapes(name: str, kind: str, k: int, dtype: torch.dtype) -> None:
    j = zoo(kind, k).to(dtype)
    agg = _build(name, k)
    for _ in range(2):  # a second call exercises the stateful methods' EMAs
        update, weights = agg.aggregate(j, torch.ones(k, dtype=dtype))
        assert update.shape == (P,) and weights.shape == (k,)
        assert update.dtype == dtype and weights.dtype == dtype
        assert torch.isfinite(update).all() and torch.isfinite(weights).all()
    if name in LINEAR:
        scale = float(j.abs().max()) * float(weights.abs().max())
        torch.testing.assert_close(weights @ j, update, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize(
    ("name", "kind", "k"), list(itertools.product(PERMUTATION_INVARIANT, KINDS, [2, 5, 40]))
)
def test_permutation_invariant(name: str, kind: str, k: int) -> None:
    j = zoo(kind, k)
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(k))
    update, weights = _build(name, k).aggregate(j, torch.ones(k, dtype=j.dtype))
    permuted, permuted_weights = _build(name, k).aggregate(j[perm], torch.ones(k, dtype=j.dtype))
    scale = float(j.norm(dim=1).max()) * max(float(weights.abs().max()), 1.0)
    torch.testing.assert_close(permuted, update, rtol=1e-6, atol=1e-7 * scale)
    if kind != "norms":  # the weights follow their tasks (with norms spanning 8 orders of
        # magnitude, Aligned-MTL's rank cut falls on eigenvalues at rounding level, so the
        # weights of the tiniest rows may differ while the update does not)
        torch.testing.assert_close(permuted_weights, weights[perm], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize(("name", "k"), list(itertools.product(METHODS, [1, 2, 5, 40])))
def test_positive_multiple_of_the_mean_when_tasks_agree(name: str, k: int) -> None:
    j = zoo("agreeing", k)
    mean = j.mean(0)
    update, _ = _build(name, k).aggregate(j, torch.ones(k, dtype=j.dtype))
    factor = float(update @ mean / (mean @ mean))
    assert factor > 0
    torch.testing.assert_close(update, factor * mean)


def test_zoo_covers_every_method_of_part_b() -> None:
    for name in METHODS:
        assert name in BALANCERS
