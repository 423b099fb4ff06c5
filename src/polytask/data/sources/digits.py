"""``multi-digits``: MultiMNIST-style pairs of overlapping digits built from scikit-learn's
bundled 8x8 digits (nothing is downloaded)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from polytask.data.sources.common import check_minimums, hide_labels, rng_for
from polytask.data.sources.registry import DATASETS
from polytask.data.table import MultiLabelTable
from polytask.errors import ConfigError
from polytask.tasks import TaskSpec

DIGIT_SIDE = 8
JITTER = 1  # each digit moves by -1, 0 or +1 pixel along each axis
POOL_FRACTIONS = (0.7, 0.15, 0.15)  # source digits for train / val / test pairs


def split_pools(
    labels: np.ndarray, *, seed: int, fractions: tuple[float, float, float] = POOL_FRACTIONS
) -> list[np.ndarray]:
    """Disjoint, sorted index arrays (train, val, test) over the source digits, stratified by
    class: each class's digits are shuffled by ``seed`` and cut at the rounded fractions."""
    rng = rng_for(seed, 0)
    cuts = np.cumsum(fractions)[:-1]
    pools: list[list[np.ndarray]] = [[] for _ in fractions]
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        bounds = np.round(cuts * len(members)).astype(int)
        for pool, part in zip(pools, np.split(members, bounds), strict=True):
            pool.append(part)
    return [np.sort(np.concatenate(parts)) for parts in pools]


@dataclass(frozen=True)
class DigitPairs:
    """Generated canvases and where they came from (indices into ``load_digits``)."""

    images: np.ndarray  # float32 [N, 1, S, S] in [0, 1]
    left_index: np.ndarray  # int64 [N]
    right_index: np.ndarray  # int64 [N]
    left_label: np.ndarray  # int64 [N]
    right_label: np.ndarray  # int64 [N]
    offsets: np.ndarray  # int64 [N, 4]: top/left corner of the left digit, then of the right one
    split: np.ndarray  # int8 [N]: 0 train, 1 val, 2 test
    pools: list[np.ndarray]  # source-digit indices of each split


def canvas_side(overlap: int) -> int:
    """Canvas height and width: two digits on a diagonal plus the jitter margin."""
    return 2 * DIGIT_SIDE - overlap + 2 * JITTER


def _paste(canvas: np.ndarray, digits: np.ndarray, top: np.ndarray, left: np.ndarray) -> None:
    n = len(digits)
    span = np.arange(DIGIT_SIDE)
    rows = top[:, None, None] + span[None, :, None]
    cols = left[:, None, None] + span[None, None, :]
    canvas[np.arange(n)[:, None, None], rows, cols] = digits


def make_digit_pairs(
    *, num_train: int, num_val: int, num_test: int, overlap: int, seed: int
) -> DigitPairs:
    """Pairs of digits drawn within each split's pool of source digits: the left digit near the
    top-left corner, the right one shifted down and right so the two overlap by ``overlap``
    pixels along each axis, each moved by a random ±``JITTER`` pixels, merged by pixel-wise max."""
    check_minimums(
        "multi-digits",
        {"num_train": (num_train, 1), "num_val": (num_val, 0), "num_test": (num_test, 0)},
    )
    if not 0 <= overlap <= DIGIT_SIDE:
        raise ConfigError(f"multi-digits: overlap must be in 0..{DIGIT_SIDE}, found {overlap}")
    from sklearn.datasets import load_digits  # slow import (~0.8 s), only when building

    digits = load_digits()
    images = np.asarray(digits.images, dtype=np.float32) / 16.0
    labels = np.asarray(digits.target, dtype=np.int64)
    pools = split_pools(labels, seed=seed)
    counts = (num_train, num_val, num_test)
    index = [
        rng_for(seed, 1 + code).choice(pool, size=(count, 2))
        for code, (pool, count) in enumerate(zip(pools, counts, strict=True))
    ]
    pairs = np.concatenate(index).astype(np.int64)
    n = len(pairs)
    offsets = rng_for(seed, 4).integers(-JITTER, JITTER + 1, size=(n, 4)) + JITTER
    offsets[:, 2:] += DIGIT_SIDE - overlap
    side = canvas_side(overlap)
    first = np.zeros((n, side, side), dtype=np.float32)
    second = np.zeros_like(first)
    _paste(first, images[pairs[:, 0]], offsets[:, 0], offsets[:, 1])
    _paste(second, images[pairs[:, 1]], offsets[:, 2], offsets[:, 3])
    return DigitPairs(
        images=np.maximum(first, second)[:, None],
        left_index=pairs[:, 0],
        right_index=pairs[:, 1],
        left_label=labels[pairs[:, 0]],
        right_label=labels[pairs[:, 1]],
        offsets=offsets,
        split=np.repeat(np.arange(3, dtype=np.int8), counts),
        pools=pools,
    )


@DATASETS.register("multi-digits", "MultiMNIST-style pairs of overlapping digits (4 tasks)")
def multi_digits(
    *,
    seed: int,
    num_train: int = 12_000,
    num_val: int = 1_500,
    num_test: int = 1_500,
    overlap: int = 2,
    missing_fraction: float = 0.0,
) -> MultiLabelTable:
    """Two overlapping handwritten digits per image, as in MultiMNIST.

    The 1,797 source digits are first split 70/15/15 (stratified, by ``seed``) into train, val and
    test pools; pairs are drawn only within a pool, so no source digit appears in two splits, and
    the table carries that fixed ``split``. Tasks: ``left`` and ``right`` (the digits, multiclass),
    ``sum`` (their sum, regression) and ``both_even`` (binary). ``missing_fraction`` hides that
    fraction of each task's labels at random.

    References:
        Sener, O. and Koltun, V., 2018. Multi-Task Learning as Multi-Objective Optimization.
        NeurIPS 2018 (MultiMNIST, after Sabour, Frosst and Hinton, NeurIPS 2017).
        Digits: Alpaydin, E. and Kaynak, C., 1998. Optical Recognition of Handwritten Digits.
        UCI Machine Learning Repository (``sklearn.datasets.load_digits``).
    """
    pairs = make_digit_pairs(
        num_train=num_train, num_val=num_val, num_test=num_test, overlap=overlap, seed=seed
    )
    tasks = [
        TaskSpec("left", "multiclass", num_classes=10),
        TaskSpec("right", "multiclass", num_classes=10),
        TaskSpec("sum", "regression"),
        TaskSpec("both_even", "binary"),
    ]
    targets = {
        "left": pairs.left_label,
        "right": pairs.right_label,
        "sum": (pairs.left_label + pairs.right_label).astype(np.float32),
        "both_even": ((pairs.left_label % 2 == 0) & (pairs.right_label % 2 == 0)).astype(
            np.float32
        ),
    }
    return MultiLabelTable(
        inputs=pairs.images,
        targets=hide_labels(targets, tasks, fraction=missing_fraction, seed=seed),
        tasks=tasks,
        split=pairs.split,
        source="multi-digits",
    )
