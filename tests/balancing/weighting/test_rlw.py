"""Random Loss Weighting (Lin et al., TMLR 2022): seeded draws on the simplex."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from polytask.balancing.weighting import (
    RandomLossWeighting,
)
from polytask.balancing.weighting._rlw import _step_seed


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
