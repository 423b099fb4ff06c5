"""CAGrad's dual solved in torch on the Gramian's device (``conflict_averse_coefficients``):
the same constrained optimum as the NumPy solver and as a face-by-face brute force, on the hard
zoo (norms 1e-4..1e4 in one matrix, zero, duplicated and near-opposite rows, K > P), K from 2
to 40, c from 0.1 to 0.8, float32 and float64; and no value read on the host while it runs."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from guarantees import HARD_KINDS, check_cagrad, hard_jacobian
from torch import Tensor
from torch.overrides import TorchFunctionMode

from polytask.balancing.aggregation._cagrad import CAGrad, cagrad_weights
from polytask.balancing.solvers.conflict_averse import conflict_averse_coefficients
from polytask.errors import ConfigError

C = 0.4


def _update(j: Tensor, weights: Tensor) -> np.ndarray:
    return (weights.double() @ j.double()).numpy()


def _scale(j: Tensor, *weights: Tensor) -> float:
    """``Σ_i |w_i| ||g_i||``, the size of the update's terms, for the largest of ``weights``."""
    norms = j.double().norm(dim=1)
    return max(float(w.double().abs() @ norms) for w in weights)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", HARD_KINDS)
def test_torch_solve_equals_the_numpy_solver(kind: str, dtype: torch.dtype) -> None:
    """The updates ``d = wᵀJ`` of both solvers agree to ``1e-12`` (float64) or ``100·eps32``
    (float32, the weights rounded to the Gramian's dtype) of ``Σ_i |w_i| ||g_i||``."""
    tol = 1e-12 if dtype == torch.float64 else 100 * torch.finfo(torch.float32).eps
    broken = {}
    for k, p in itertools.product((2, 3, 5, 10, 20, 40), (10, 1000)):
        j = hard_jacobian(kind, k, p).to(dtype)
        g = j @ j.T
        mine = cagrad_weights(g, c=C, solver="torch")
        reference = cagrad_weights(g, c=C, solver="numpy")
        assert mine.dtype == dtype and mine.device == g.device
        gap = np.linalg.norm(_update(j, mine) - _update(j, reference))
        if not gap <= tol * _scale(j, mine, reference):
            broken[(k, p)] = f"{gap / _scale(j, mine, reference):.2g}"
    assert not broken, f"{kind} ({dtype}): (K, P) -> relative gap {broken}"


@pytest.mark.parametrize("c", [0.1, 0.8])
@pytest.mark.parametrize("kind", HARD_KINDS)
def test_torch_solve_equals_the_numpy_solver_for_other_radii(kind: str, c: float) -> None:
    """As above in float64 for a small and a large ball, with P = 5 < K (0 in the hull of the
    gradients, the case where ``||g_w||`` is not smooth) and other seeds."""
    broken = {}
    for k, p, seed in itertools.product((2, 4, 7, 15, 30, 40), (5, 1000), (2, 3)):
        j = hard_jacobian(kind, k, p, seed)
        g = j @ j.T
        mine = cagrad_weights(g, c=c, solver="torch")
        reference = cagrad_weights(g, c=c, solver="numpy")
        gap = np.linalg.norm(_update(j, mine) - _update(j, reference))
        if not gap <= 1e-12 * _scale(j, mine, reference):
            broken[(k, p, seed)] = f"{gap / _scale(j, mine, reference):.2g}"
    assert not broken, f"{kind} (c = {c}): (K, P, seed) -> relative gap {broken}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", HARD_KINDS)
def test_torch_solve_meets_the_guarantee_against_brute_force(kind: str, dtype: torch.dtype) -> None:
    """``check_cagrad`` (the optimum by enumerating every face of the simplex, K <= 10):
    ``d'`` in the ball and ``min_i <g_i, d'>`` optimal to ``100·K·eps·‖d'‖·max_active ‖g_i‖``."""
    broken = {}
    for k, p in itertools.product((2, 3, 5, 10), (10, 100)):
        j = hard_jacobian(kind, k, p).to(dtype)
        weights = cagrad_weights(j @ j.T, c=C, solver="torch")
        jd = j.double().numpy()
        d = _update(j, weights)
        worst = check_cagrad(jd, d, weights.double().numpy(), CAGrad(["a"]), dtype)
        if not worst <= 1.0:
            broken[(k, p)] = f"{worst:.3g}"
    assert not broken, f"{kind} ({dtype}): (K, P) -> violation / tolerance {broken}"


def test_hand_cases_and_edges() -> None:
    # orthogonal unit gradients: w = (1/2, 1/2), ||g_w|| = 1/√2, (s/||g_w||) w = s/√2 each
    out = conflict_averse_coefficients(torch.eye(2), center=torch.full((2,), 0.5), radius=0.2)
    torch.testing.assert_close(out, torch.full((2,), 0.2 / math.sqrt(2)))
    assert out.dtype == torch.float32
    # radius 0, exactly opposed gradients (0 in the hull), all-zero and empty Gramians: 0
    g = torch.tensor([[1.0, -1.0], [-1.0, 1.0]], dtype=torch.float64)
    for gram, radius in [(torch.eye(3), 0.0), (g, 0.5), (torch.zeros(3, 3), 0.5)]:
        k = gram.shape[0]
        out = conflict_averse_coefficients(gram, center=torch.full((k,), 1 / k), radius=radius)
        assert torch.equal(out, torch.zeros(k, dtype=gram.dtype))
    empty = conflict_averse_coefficients(torch.zeros(0, 0), center=torch.zeros(0), radius=1.0)
    assert empty.shape == (0,)
    # one task: the weight (1 + c) / (1 + c²), as the NumPy path gives
    one = cagrad_weights(torch.tensor([[25.0]]), c=C, solver="torch")
    torch.testing.assert_close(one, torch.tensor([1.4 / 1.16]))
    with pytest.raises(ConfigError, match="solver must be one of"):
        cagrad_weights(torch.eye(2), c=C, solver="gpu")  # type: ignore[arg-type]


class _HostReads(TorchFunctionMode):
    """Records every tensor operation that hands a value to Python or moves data to the host."""

    READS = frozenset({"item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__"})
    READS |= {"__index__", "nonzero", "argwhere", "unique", "masked_select", "__len__"}

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        name = getattr(func, "__name__", str(func))
        if name in self.READS:
            self.seen.append(name)
        out = func(*args, **(kwargs or {}))
        moved = name in ("to", "copy_") and isinstance(out, Tensor)
        if moved and isinstance(args[0], Tensor) and out.device != args[0].device:
            self.seen.append(f"{name}({out.device})")
        return out


def test_the_torch_solve_reads_nothing_on_the_host() -> None:
    """No ``.item()``, ``.tolist()``, ``bool(tensor)``, ``.cpu()`` … in the solve (the CUDA check
    proper, ``torch.cuda.set_sync_debug_mode("error")``, is in ``benchmarks/cagrad_device.py``),
    while the NumPy path is seen reading its Gramian (the recorder works)."""
    j = hard_jacobian("mixed", 10, 100)
    g = j @ j.T
    with _HostReads() as reads:
        weights = cagrad_weights(g, c=C, solver="torch")
    assert reads.seen == []
    assert weights.device == g.device and weights.dtype == g.dtype
    with _HostReads() as reads:
        cagrad_weights(g, c=C, solver="numpy")
    assert reads.seen


def test_aggregator_on_cpu_keeps_the_numpy_solver() -> None:
    """``solver="auto"`` on a CPU Gramian is the NumPy solve (bit for bit)."""
    j = hard_jacobian("opposed", 5, 100)
    g = j @ j.T
    assert torch.equal(cagrad_weights(g, c=C), cagrad_weights(g, c=C, solver="numpy"))
