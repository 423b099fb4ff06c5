"""Shared helpers of the balancing tests: real training steps on a tiny model, and the Jacobians
(a zoo of shapes) that the aggregation and solver tests run over.

Imported by the test modules of this folder (pytest puts the folder on ``sys.path``; the name
does not start with ``test_``, so it is not collected).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from polytask.balancing import BALANCERS, Balancer, BalanceResult
from polytask.models import build_model
from polytask.tasks import TaskSpec


def tiny_tasks() -> list[TaskSpec]:
    """A regression, a binary and a 3-class task."""
    return [
        TaskSpec("r", "regression"),
        TaskSpec("b", "binary"),
        TaskSpec("c", "multiclass", num_classes=3),
    ]


def tiny_steps(
    name: str, *, presents: Sequence[Tensor | None] = (None,), **params: Any
) -> tuple[BalanceResult, nn.Module, Balancer]:
    """One real step per entry of ``presents`` (the present-task mask of that step) with the
    registered method ``name``; after each, the weights and every parameter's gradient must be
    finite. Returns the last result, the model and the balancer."""
    torch.manual_seed(0)
    tasks = tiny_tasks()
    model = build_model(tasks, (4,), encoder_params={"hidden": [8]})
    balancer: Balancer = BALANCERS.get(name)(tasks, **params)
    balancer.attach(model)
    result: BalanceResult | None = None
    for present in presents:
        model.zero_grad()
        x = torch.randn(16, 4)
        y = {"r": torch.randn(16), "b": torch.rand(16).round(), "c": torch.randint(0, 3, (16,))}
        out = model(x)
        losses = {t.name: t.compute_loss(out.outputs[t.name], y[t.name])[0] for t in tasks}
        result = balancer.backward(
            losses, shared_params=model.shared_parameters(), features=out.features, present=present
        )
        assert result.weights.shape == (3,) and torch.isfinite(result.weights).all()
        for p in model.parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all()
    assert result is not None
    return result, model, balancer


ZOO_KINDS = ["agreeing", "orthogonal", "opposed", "zero_row", "duplicates", "norms", "random"]


def step_weights(name: str, present: Tensor | None = None, **params: Any) -> Tensor:
    """One real step of method ``name`` on the tiny model (every parameter gets a finite
    gradient); the weights it chose."""
    return tiny_steps(name, presents=(present,), **params)[0].weights


def cone_jacobian(k: int, p: int, seed: int) -> Tensor:
    """A float64 ``[k, p]`` Jacobian for the dual-cone methods: an opposed pair of rows for odd
    seeds, row norms spread over 1e-2..1e2 when ``seed % 3 == 2``."""
    gen = torch.Generator().manual_seed(seed)
    j = torch.randn(k, p, generator=gen, dtype=torch.float64)
    if seed % 2:
        j[1] = -0.95 * j[0] + 0.1 * j[1]  # opposed pair
    if seed % 3 == 2:
        j = j * torch.logspace(-2, 2, k, dtype=torch.float64)[:, None]
    return j


def zoo_jacobian(kind: str, k: int, *, p: int, seed: int) -> Tensor:
    """A K×P float64 Jacobian of the given kind (one of ``ZOO_KINDS``): identical rows,
    orthogonal rows of different norms, alternating opposed rows (cosine < -0.9), a zero row,
    duplicated rows, norms from 1e-4 to 1e4, or random."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(k, p, generator=gen, dtype=torch.float64)
    if kind == "agreeing":
        return base[0].repeat(k, 1)
    if kind == "orthogonal":
        q, _ = torch.linalg.qr(base.T)  # [P, k], orthonormal columns
        return q.T * torch.linspace(0.5, 3.0, k, dtype=torch.float64)[:, None]
    if kind == "opposed":
        signs = torch.tensor([(-1.0) ** i for i in range(k)], dtype=torch.float64)
        sizes = torch.linspace(1.0, 2.0, k, dtype=torch.float64)
        out = (signs * sizes)[:, None] * base[0] + 0.05 * base
        if k >= 2:
            assert float(torch.cosine_similarity(out[0], out[1], dim=0)) < -0.9
        return out
    if kind == "zero_row":
        base[0] = 0.0
        return base
    if kind == "duplicates":
        base[1 % k] = base[0]
        if k >= 5:
            base[3] = base[2]
            base[4] = base[2]
        return base
    if kind == "norms":
        return base * torch.logspace(-4, 4, k, dtype=torch.float64)[:, None]
    return base


def solver_jacobian(kind: str, k: int, p: int, seed: int) -> Tensor:
    """Random Jacobians for the solvers' tests, plus the degenerate shapes the solvers must
    survive (``kind`` one of ``random``, ``duplicates``, ``scales``, ``opposed``, ``low_rank``)."""
    gen = torch.Generator().manual_seed(seed)
    j = torch.randn(k, p, generator=gen, dtype=torch.float64)
    if kind == "duplicates" and k >= 3:
        j[1] = j[0]
        j[2] = 0.0
    elif kind == "scales":
        j = j * torch.logspace(-4, 4, k, dtype=torch.float64)[:, None]
    elif kind == "opposed":
        j[1] = -0.95 * j[0] + 0.05 * j[1]
    elif kind == "low_rank":
        j = j[:, :2] @ torch.randn(2, p, generator=gen, dtype=torch.float64)
    return j


#: (kind, K, seed) of the solvers' tests
SOLVER_CASES = [
    (kind, k, seed)
    for kind in ["random", "duplicates", "scales", "opposed", "low_rank"]
    for k in (2, 3, 7, 40)
    for seed in (0, 1)
]
