"""Every gradient method's numerical guarantee (stated in its docstring) on the hard zoo of
``guarantees.py``: row norms from 1e-4 to 1e4 in one matrix (increasing and decreasing), a zero
row, duplicated rows, near-opposite rows (cosine < −0.9), K from 2 to 10 and P from 10 to 1000,
in float64 and float32, with default hyper-parameters. A failure names every case that broke
the guarantee and by how much (violation / stated tolerance)."""

from __future__ import annotations

import itertools
import re

import pytest
import torch
from guarantees import CHECKS, HARD_K, HARD_KINDS, HARD_P, violation

from polytask.balancing import BALANCERS, GradientAggregator


@pytest.mark.parametrize(("name", "kind"), list(itertools.product(CHECKS, HARD_KINDS)))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_the_guarantee_holds_on_the_hard_zoo(name: str, kind: str, dtype: torch.dtype) -> None:
    broken = {}
    for k, p in itertools.product(HARD_K, HARD_P):
        worst = violation(name, kind, k, p, dtype)
        if not worst <= 1.0:
            broken[(k, p)] = f"{worst:.3g}"
    assert not broken, f"{name} on {kind} ({dtype}), (K, P): violation / tolerance = {broken}"


def test_every_gradient_method_has_a_guarantee_check() -> None:
    gradient = {n for n in BALANCERS.names() if issubclass(BALANCERS.get(n), GradientAggregator)}
    assert gradient == set(CHECKS)
    for name in gradient:  # and states it, citing its paper (a year)
        doc = BALANCERS.get(name).__doc__ or ""
        assert "Numerical guarantee" in doc and re.search(r"\b20\d\d\b", doc), name
