"""Shared properties of MGDA, MGDA-UB, PCGrad, CAGrad, UPGrad, DualProj and IMTL-G over a zoo of
Jacobians (agreeing, orthogonal, opposed, zero row, duplicate rows, norms from 1e-4 to 1e4;
K = 1, 2, 5, 40; P = 50): finite output with the right shapes, permutation invariance (all but
PCGrad, whose task order is random) and the mean direction when every task agrees."""

from __future__ import annotations

import itertools

import pytest
import torch
from tiny_steps import ZOO_KINDS, zoo_jacobian
from torch import Tensor

from polytask.balancing import BALANCERS

P = 50
METHODS = ["mgda", "mgda_ub", "pcgrad", "cagrad", "upgrad", "dualproj", "imtl_g"]
PERMUTATION_INVARIANT = [m for m in METHODS if m != "pcgrad"]
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
KINDS = ZOO_KINDS


def zoo(kind: str, k: int, seed: int = 0) -> Tensor:
    """A K×P float64 Jacobian of the given kind."""
    return zoo_jacobian(kind, k, p=P, seed=1000 * k + seed)


def _build(name: str, k: int) -> torch.nn.Module:
    return BALANCERS.get(name)([f"t{i}" for i in range(k)])


CASES = list(itertools.product(METHODS, KINDS, [1, 2, 5, 40]))


@pytest.mark.parametrize(("name", "kind", "k"), CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_finite_with_the_right_shapes(name: str, kind: str, k: int, dtype: torch.dtype) -> None:
    j = zoo(kind, k).to(dtype)
    update, weights = _build(name, k).aggregate(j, torch.ones(k, dtype=dtype))
    assert update.shape == (P,) and weights.shape == (k,)
    assert update.dtype == dtype
    assert torch.isfinite(update).all() and torch.isfinite(weights).all()
    torch.testing.assert_close(weights @ j, update, rtol=1e-4, atol=1e-5 * float(j.abs().max()))


@pytest.mark.parametrize(
    ("name", "kind", "k"), list(itertools.product(PERMUTATION_INVARIANT, KINDS, [2, 5, 40]))
)
def test_permutation_invariant(name: str, kind: str, k: int) -> None:
    j = zoo(kind, k)
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(k))
    update, _ = _build(name, k).aggregate(j, torch.ones(k, dtype=j.dtype))
    permuted, _ = _build(name, k).aggregate(j[perm], torch.ones(k, dtype=j.dtype))
    scale = float(j.norm(dim=1).max())
    torch.testing.assert_close(permuted, update, rtol=1e-6, atol=1e-7 * scale)


@pytest.mark.parametrize(("name", "k"), list(itertools.product(METHODS, [1, 2, 5, 40])))
def test_mean_direction_when_tasks_agree(name: str, k: int) -> None:
    j = zoo("agreeing", k)
    update, _ = _build(name, k).aggregate(j, torch.ones(k, dtype=j.dtype))
    torch.testing.assert_close(update, AGREEING_SCALE[name](k) * j.mean(0))


def test_zoo_covers_every_method_of_part_a() -> None:
    for name in METHODS:
        assert name in BALANCERS
