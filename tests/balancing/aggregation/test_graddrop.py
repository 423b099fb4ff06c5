"""GradDrop (Chen et al., NeurIPS 2020): sign purity by hand, every coordinate is the sum of the
positive or of the negative parts, exact where signs agree, the keep-positive frequency matches
the purity, leak, the seeded and checkpointed draws, real training steps."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from tiny_steps import tiny_steps

from polytask.balancing import BALANCERS
from polytask.balancing.aggregation._graddrop import GradDrop, graddrop_update, sign_purity
from polytask.errors import ConfigError


def _train_step(name: str, **params: Any) -> None:
    """One real step on a tiny model: every parameter gets a finite gradient."""
    tiny_steps(name, **params)


def test_hand_case() -> None:
    # column 1: (3, −1): P = ½ (1 + (3 − 1) / (3 + 1)) = ½ (1 + ½) = 0.75
    # column 2: (1, 2): P = ½ (1 + 3/3) = 1;   column 3: (−2, −1): P = ½ (1 − 3/3) = 0
    # column 4: (0, 0): P = ½ (nothing to keep: the update is 0 either way)
    j = torch.tensor([[3.0, 1.0, -2.0, 0.0], [-1.0, 2.0, -1.0, 0.0]])
    assert sign_purity(j).tolist() == [0.75, 1.0, 0.0, 0.5]
    # U = (0.7, 0.3, 0.3, 0.3): 0.7 < 0.75 keeps + in column 1 → 3; columns 2, 3 are the sums
    assert graddrop_update(j, torch.tensor([0.7, 0.3, 0.3, 0.3])).tolist() == [3.0, 3.0, -3.0, 0.0]
    # U = 0.8 ≥ 0.75 keeps − in column 1 → −1
    assert graddrop_update(j, torch.tensor([0.8, 0.3, 0.3, 0.3])).tolist() == [-1.0, 3.0, -3.0, 0.0]
    # leak ½: ½·(sum) + ½·(kept); column 1 sum = 2, kept = −1 → 0.5
    leaky = graddrop_update(j, torch.tensor([0.8, 0.3, 0.3, 0.3]), leak=0.5)
    assert leaky.tolist() == [0.5, 3.0, -3.0, 0.0]


@pytest.mark.parametrize("k", [1, 2, 3, 7])
def test_every_coordinate_is_one_signed_sum(k: int) -> None:
    gen = torch.Generator().manual_seed(k)
    j = torch.randn(k, 400, generator=gen)
    j[:, :100] = j[:, :100].abs()  # all positive
    j[:, 100:200] = -j[:, 100:200].abs()  # all negative
    j[0, 200:220] = 0.0  # zeros mixed in
    update, weights = GradDrop([f"t{i}" for i in range(k)], seed=k).aggregate(j, torch.ones(k))
    assert torch.equal(weights, torch.ones(k))
    positive = j.clamp(min=0).sum(0)
    negative = j.clamp(max=0).sum(0)
    assert ((update == positive) | (update == negative)).all()
    # where every task has the same sign, exactly their sum
    same_sign = (j >= 0).all(0) | (j <= 0).all(0)
    assert torch.equal(update[same_sign], j.sum(0)[same_sign])


# (3, −1): P = ½ (1 + 2/4) = 0.75;   (−3, 1, 0.5): P = ½ (1 − 1.5/4.5) = 1/3
@pytest.mark.parametrize(("column", "purity"), [((3.0, -1.0), 0.75), ((-3.0, 1.0, 0.5), 1 / 3)])
def test_keep_positive_frequency_matches_purity(column: tuple[float, ...], purity: float) -> None:
    n = 40_000
    j = torch.tensor(column)[:, None].repeat(1, n)
    assert float(sign_purity(j)[0]) == pytest.approx(purity)
    update, _ = GradDrop([f"t{i}" for i in range(len(column))]).aggregate(
        j, torch.ones(len(column))
    )
    positive = float(j[:, 0].clamp(min=0).sum())
    frequency = float((update == positive).double().mean())
    sigma = (purity * (1 - purity) / n) ** 0.5
    assert abs(frequency - purity) < 5 * sigma


def test_leak_one_is_the_plain_sum() -> None:
    j = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    update, _ = GradDrop(list("abc"), leak=1.0).aggregate(j, torch.ones(3))
    torch.testing.assert_close(update, j.sum(0))


def test_seeded_draws_and_state_dict_round_trip() -> None:
    gen = torch.Generator().manual_seed(1)
    jacobians = [torch.randn(3, 200, generator=gen) for _ in range(5)]
    first = GradDrop(list("abc"), seed=5)
    twin = GradDrop(list("abc"), seed=5)
    other = GradDrop(list("abc"), seed=6)
    a, _ = first.aggregate(jacobians[0], torch.ones(3))
    b, _ = twin.aggregate(jacobians[0], torch.ones(3))
    c, _ = other.aggregate(jacobians[0], torch.ones(3))
    assert torch.equal(a, b) and not torch.equal(a, c)
    a2, _ = first.aggregate(jacobians[0], torch.ones(3))
    assert not torch.equal(a, a2)  # a fresh draw every step
    resumed = GradDrop(list("abc"), seed=5)
    resumed.load_state_dict({k: v.clone() for k, v in first.state_dict().items()})
    for j in jacobians[1:]:
        x, _ = first.aggregate(j, torch.ones(3))
        y, _ = resumed.aggregate(j, torch.ones(3))
        assert torch.equal(x, y)
    assert int(resumed.draws) == 6


def test_training_step() -> None:
    _train_step("graddrop")  # the representation level, the default
    _train_step("graddrop", level="features", leak=0.2)
    _train_step("graddrop", level="parameters")  # the parameter level, as an option


def test_the_representation_level_is_the_default() -> None:
    assert GradDrop(["a", "b"]).level == "features"
    assert GradDrop(["a", "b"], level="parameters").level == "parameters"


def test_registry_and_errors() -> None:
    assert BALANCERS.get("graddrop") is GradDrop
    assert set(BALANCERS.parameters("graddrop")) == {"leak", "seed", "level", "update_every"}
    for bad in (-0.1, 1.5):
        with pytest.raises(ConfigError, match="leak"):
            GradDrop(["a"], leak=bad)
    with pytest.raises(ConfigError, match="seed"):
        GradDrop(["a"], seed=-1)
    with pytest.raises(ConfigError, match="update_every"):
        GradDrop(["a"], update_every=3)
