"""Which tasks should share a model: the best split of the tasks into groups, from an inter-task
affinity matrix (Fifty, Amid, Zhao, Yu, Anil & Finn, "Efficiently Identifying Task Groupings for
Multi-Task Learning", NeurIPS 2021, section 3.2).

``affinity[i, j]`` is how much a step on task ``i`` helps task ``j`` (``Z_{i→j}``). A group's
score for one of its tasks ``j`` is the mean affinity onto ``j`` from the group's other members
(0 for a task alone: nothing transfers to it); a split's *total affinity* is the sum of every
task's score in its group. ``best_splits`` finds, for each number of groups 1..G, the split of
the tasks into exactly that many non-empty groups with the highest total affinity: exhaustively
(every split, by dynamic programming over subsets) for up to ``exhaustive_up_to`` tasks, by a
greedy merge and local search beyond.

Example:
    >>> import numpy as np
    >>> affinity = np.array([[0, .5, -.1], [.4, 0, -.2], [-.1, -.3, 0]])
    >>> [(s.groups, round(s.total, 3)) for s in best_splits(affinity, ["a", "b", "c"], 2)]
    [([['a', 'b', 'c']], 0.1), ([['a', 'b'], ['c']], 0.9)]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from polytask.errors import ConfigError

__all__ = ["Split", "best_splits", "split_total"]

#: up to this many tasks every split is considered (3^K subset pairs per group count)
EXHAUSTIVE_UP_TO = 10


@dataclass(frozen=True)
class Split:
    """The tasks split into groups, and the split's predicted total affinity."""

    groups: list[list[str]]
    total: float
    exhaustive: bool

    def group_of(self, task: str) -> list[str]:
        """The group that holds ``task``."""
        return next(group for group in self.groups if task in group)


def _check(affinity: np.ndarray, tasks: Sequence[str]) -> np.ndarray:
    matrix = np.asarray(affinity, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ConfigError(f"affinity: a square K x K matrix, found shape {matrix.shape}")
    if len(tasks) != matrix.shape[0]:
        raise ConfigError(f"affinity: {matrix.shape[0]} tasks in the matrix, {len(tasks)} names")
    if not np.isfinite(matrix).all():
        raise ConfigError("affinity: every entry must be finite (a task never present?)")
    return matrix


def group_score(affinity: np.ndarray, members: Sequence[int]) -> float:
    """Sum over the group's tasks ``j`` of the mean affinity onto ``j`` from the others."""
    if len(members) < 2:
        return 0.0
    block = affinity[np.ix_(members, members)]
    onto = block.sum(axis=0) - np.diag(block)
    return float(onto.sum() / (len(members) - 1))


def split_total(affinity: np.ndarray, groups: Sequence[Sequence[int]]) -> float:
    """The total affinity of a split given as lists of task indices."""
    return sum(group_score(np.asarray(affinity, dtype=np.float64), g) for g in groups)


def _members(mask: int) -> list[int]:
    return [i for i in range(mask.bit_length()) if mask >> i & 1]


def _exhaustive(matrix: np.ndarray, max_groups: int) -> list[tuple[list[list[int]], float]]:
    """Best split per group count by dynamic programming over subsets: the best split of a set
    into ``g`` groups is the best group holding its lowest task plus the best split of the rest
    into ``g - 1`` groups; every split is covered exactly once."""
    k = len(matrix)
    full = (1 << k) - 1
    score = [group_score(matrix, _members(mask)) for mask in range(full + 1)]
    best: list[dict[int, tuple[float, int]]] = [{0: (0.0, 0)}]  # g -> {mask: (total, group)}
    for g in range(1, max_groups + 1):
        table: dict[int, tuple[float, int]] = {}
        previous = best[g - 1]
        for mask in range(1, full + 1):
            low = mask & -mask
            rest = mask ^ low
            sub, top = rest, (-np.inf, 0)
            while True:  # every subset of `rest`, joined with the lowest task
                group = sub | low
                remainder = mask ^ group
                if remainder in previous:
                    total = score[group] + previous[remainder][0]
                    if total > top[0]:
                        top = (total, group)
                if sub == 0:
                    break
                sub = (sub - 1) & rest
            if top[1]:
                table[mask] = top
        best.append(table)
    out = []
    for g in range(1, max_groups + 1):
        groups, mask = [], full
        for level in range(g, 0, -1):
            group = best[level][mask][1]
            groups.append(_members(group))
            mask ^= group
        out.append((groups, best[g][full][0]))
    return out


def _greedy(matrix: np.ndarray, groups_wanted: int) -> list[list[int]]:
    """Merge the pair of groups that gains most, from singletons down to ``groups_wanted``
    groups, then move single tasks between groups while that raises the total."""
    groups = [[i] for i in range(len(matrix))]
    while len(groups) > groups_wanted:
        best_gain, pair = -np.inf, (0, 1)
        for a in range(len(groups)):
            for b in range(a + 1, len(groups)):
                gain = (
                    group_score(matrix, groups[a] + groups[b])
                    - group_score(matrix, groups[a])
                    - group_score(matrix, groups[b])
                )
                if gain > best_gain:
                    best_gain, pair = gain, (a, b)
        a, b = pair
        groups[a] = sorted(groups[a] + groups[b])
        del groups[b]
    improved = True
    while improved:
        improved = False
        for task in range(len(matrix)):
            source = next(g for g in groups if task in g)
            if len(source) == 1:  # moving it would leave an empty group
                continue
            before = split_total(matrix, groups)
            for target in groups:
                if target is source:
                    continue
                source.remove(task)
                target.append(task)
                if split_total(matrix, groups) > before + 1e-12:
                    improved = True
                    break
                target.remove(task)
                source.append(task)
            if improved:
                break
    return [sorted(g) for g in groups]


def best_splits(
    affinity: np.ndarray,
    tasks: Sequence[str],
    max_groups: int,
    *,
    exhaustive_up_to: int = EXHAUSTIVE_UP_TO,
) -> list[Split]:
    """For each number of groups 1..``max_groups`` (at most one group per task), the split with
    the highest total affinity: exact up to ``exhaustive_up_to`` tasks, greedy beyond."""
    matrix = _check(affinity, tasks)
    if max_groups < 1:
        raise ConfigError(f"groups: must be >= 1, found {max_groups}")
    count = min(max_groups, len(tasks))
    exhaustive = len(tasks) <= exhaustive_up_to
    if exhaustive:
        found = _exhaustive(matrix, count)
    else:
        found = [
            (g, split_total(matrix, g)) for g in (_greedy(matrix, n + 1) for n in range(count))
        ]
    splits = []
    for groups, total in found:
        ordered = sorted((sorted(g) for g in groups), key=lambda g: g[0])
        names = [[tasks[i] for i in group] for group in ordered]
        splits.append(Split(names, float(total), exhaustive))
    return splits
