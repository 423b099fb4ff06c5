"""Dynamic Weight Average (Liu, Johns & Davison, CVPR 2019): hand cases, absent tasks."""

from __future__ import annotations

import math

import pytest
import torch

from polytask.balancing.weighting import (
    DynamicWeightAverage,
)

ALL = torch.tensor([True, True])


def test_dwa_hand_case_with_absent_tasks() -> None:
    dwa = DynamicWeightAverage(["a", "b", "c"], window=2, temperature=2.0)
    t, f = True, False
    calls = [
        ([2.0, 4.0, 1.0], [t, t, t]),
        ([4.0, 2.0, 0.0], [t, t, f]),  # window 1: a = (2+4)/2 = 3, b = 3, c = 1/1 = 1
        ([1.0, 1.0, 1.0], [t, t, t]),
        ([1.0, 2.0, 0.0], [t, t, f]),  # window 2: a = 1, b = 1.5, c = 1
    ]
    for losses, present in calls:  # first two windows: weight 1 on every present task
        total, w = dwa.combine(torch.tensor(losses), torch.tensor(present))
        assert w.tolist() == [1.0 if p else 0.0 for p in present]
        assert float(total) == pytest.approx(
            sum(v for v, p in zip(losses, present, strict=True) if p)
        )
    assert dwa.averages.tolist() == [[3.0, 3.0, 1.0], [1.0, 1.5, 1.0]]
    # r = (1/3, 1.5/3, 1/1) = (1/3, 1/2, 1); logits r / T = (1/6, 1/4, 1/2)
    e = [math.exp(1 / 6), math.exp(1 / 4), math.exp(1 / 2)]
    _, w = dwa.combine(torch.tensor([1.0, 1.0, 1.0]), torch.tensor([t, t, t]))
    assert w.tolist() == pytest.approx([3 * v / sum(e) for v in e], rel=1e-6)
    # b absent: the softmax runs over a and c and K counts the 2 present tasks
    total, w = dwa.combine(torch.tensor([2.0, 0.0, 1.0]), torch.tensor([t, f, t]))
    expected = [2 * e[0] / (e[0] + e[2]), 0.0, 2 * e[2] / (e[0] + e[2])]
    assert w.tolist() == pytest.approx(expected, rel=1e-6)
    assert float(total) == pytest.approx(2 * expected[0] + expected[2], rel=1e-6)
    assert int(dwa.windows) == 3 and int(dwa.steps) == 6


def test_dwa_task_absent_for_a_whole_window_keeps_its_average() -> None:
    dwa = DynamicWeightAverage(["a", "b"], window=1)
    dwa.combine(torch.tensor([2.0, 5.0]), ALL)
    dwa.combine(torch.tensor([1.0, 0.0]), torch.tensor([True, False]))
    assert dwa.averages.tolist() == [[2.0, 5.0], [1.0, 5.0]]  # b: 5 carried, ratio 1
    assert dwa.ratios().tolist() == [0.5, 1.0]


def test_dwa_favours_the_task_whose_loss_decreases_least() -> None:
    # the paper's property: w_k grows with r_k = L_k(t-1) / L_k(t-2)
    dwa = DynamicWeightAverage(["fast", "slow"], window=5)
    for step in range(30):
        losses = torch.tensor([0.8**step, 0.99**step])
        _, w = dwa.combine(losses, ALL)
    assert w[1] > 1.0 > w[0]
    assert float(w.sum()) == pytest.approx(2.0)
    # temperature → ∞: equal weights
    flat = DynamicWeightAverage(["fast", "slow"], window=5, temperature=1e6)
    for step in range(30):
        _, w = flat.combine(torch.tensor([0.8**step, 0.99**step]), ALL)
    assert w.tolist() == pytest.approx([1.0, 1.0], abs=1e-5)
