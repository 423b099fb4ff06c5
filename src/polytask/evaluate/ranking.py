"""Ranking-style evaluation of binary tasks: AUC, GAUC (AUC per user, averaged) and log-loss.

A recommender ranks items *for one user at a time*, so the AUC over all impressions mixes in how
well it orders users against each other, which no ranking shows. GAUC (Zhou et al., "Deep
Interest Network for Click-Through Rate Prediction", KDD 2018, eq. 9) averages the AUC of each
user's own impressions, weighted by the user's number of impressions:

    GAUC = Σ_u n_u · AUC_u / Σ_u n_u

over the users whose impressions have both a positive and a negative label (AUC is undefined
otherwise). AUC and log-loss are computed as the ``auroc`` and ``log_loss`` metrics of binary
tasks are (``polytask.tasks``), so a split's ``auc`` here is its ``auroc`` in ``evaluate``.

``ranking_report(model, dataset, tasks, groups)`` scores a split and reports, per binary task,
``auc``, ``gauc``, ``log_loss`` and the counts behind them; ``group_codes`` finds the user column
of a dataset with a categorical block (e.g. ``recsys-synthetic``'s ``user_id``).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from numpy.typing import ArrayLike
from torch import Tensor
from torchmetrics.functional.classification import binary_auroc

from polytask.data.batches import MultiLabelDataset
from polytask.data.bundle import DataBundle
from polytask.errors import DataError
from polytask.evaluate.inference import decoded_predictions
from polytask.models import MultiTaskModel
from polytask.tasks import BinaryLogLoss, TaskSpec

__all__ = ["auc", "gauc", "group_codes", "log_loss", "ranking_report"]


def _binary(values: ArrayLike, labels: ArrayLike, what: str) -> tuple[Tensor, Tensor]:
    """float64 tensors of the values (``what: "auc scores"``) and labels of equal length."""
    s = torch.as_tensor(np.asarray(values, dtype=np.float64).reshape(-1))
    y = torch.as_tensor(np.asarray(labels, dtype=np.float64).reshape(-1))
    if s.shape != y.shape:
        function, noun = what.split(" ")
        raise DataError(f"{function}: {s.shape[0]} {noun} for {y.shape[0]} labels")
    return s, y


def auc(scores: ArrayLike, labels: ArrayLike) -> float:
    """ROC-AUC: the probability that a random positive scores above a random negative (ties
    count one half), computed as the ``auroc`` metric of binary tasks is (torchmetrics'
    ``binary_auroc``, which reads scores outside [0, 1] as logits). NaN without both classes.

    Example:
        >>> auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
        0.75
    """
    s, y = _binary(scores, labels, "auc scores")
    if not bool((y == 1).any()) or not bool((y == 0).any()):
        return math.nan
    return float(binary_auroc(s, y.long(), validate_args=False))


def _group_aucs(s: np.ndarray, y: np.ndarray, g: np.ndarray) -> tuple[float, int]:
    """(GAUC, number of groups with both classes)."""
    if len(g) == 0:
        return math.nan, 0
    _, inverse = np.unique(g, return_inverse=True)
    order = np.argsort(inverse, kind="mergesort")
    bounds = np.flatnonzero(np.r_[True, np.diff(inverse[order]) != 0, True])
    total, weight, count = 0.0, 0, 0
    for start, end in itertools.pairwise(bounds):
        rows = order[start:end]
        value = auc(s[rows], y[rows])
        if not math.isnan(value):
            total += len(rows) * value
            weight += len(rows)
            count += 1
    return (total / weight if weight else math.nan), count


def gauc(scores: ArrayLike, labels: ArrayLike, groups: ArrayLike) -> float:
    """Group AUC (Zhou et al., KDD 2018): the mean of each group's AUC weighted by the group's
    number of samples, over the groups that have both classes. NaN when no group has.

    Example (user a: AUC 1 over 3 impressions; user b: a tie, AUC 0.5, over 2; user c: one class
    only, left out; GAUC = (3 · 1 + 2 · 0.5) / 5):
        >>> gauc([0.9, 0.2, 0.1, 0.3, 0.3, 0.5], [1, 0, 0, 1, 0, 1], ["a", "a", "a", "b", "b", "c"])
        0.8
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    g = np.asarray(groups).reshape(-1)
    if not len(s) == len(y) == len(g):
        raise DataError(f"gauc: {len(s)} scores, {len(y)} labels and {len(g)} groups")
    return _group_aucs(s, y, g)[0]


def log_loss(probabilities: ArrayLike, labels: ArrayLike, *, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy ``-[y log p + (1 - y) log(1 - p)]``, ``p`` clipped to
    ``[eps, 1 - eps]``, computed as the ``log_loss`` metric of binary tasks is
    (``polytask.tasks.BinaryLogLoss``). NaN for no sample.

    Example:
        >>> round(log_loss([0.5, 0.9], [1, 1]), 4)  # (ln 2 + ln(1/0.9)) / 2
        0.3993
    """
    p, y = _binary(probabilities, labels, "log_loss probabilities")
    metric = BinaryLogLoss(eps=eps)
    metric.update(p, y)
    return float(metric.compute())


def group_codes(bundle: DataBundle, split: str, column: str = "user_id") -> np.ndarray:
    """The codes of the categorical column ``column`` in one split of ``bundle`` (``train``,
    ``val`` or ``test``): the groups of GAUC. Code 0 is the reserved *unknown* code: rows of
    values not seen in training (``ranking_report`` leaves them out of GAUC)."""
    names = bundle.categorical_names or []
    if column not in names:
        raise DataError(
            f"{bundle.info.get('source', 'dataset')}: no categorical column {column!r} to group "
            f"by; categorical columns: {', '.join(names) or 'none'}"
        )
    dataset: MultiLabelDataset = getattr(bundle, split)
    inputs = dataset.inputs
    if not isinstance(inputs, dict) or "categorical" not in inputs:
        raise DataError(f"split {split!r} has no categorical input block")
    return inputs["categorical"][:, names.index(column)].cpu().numpy()


def ranking_report(
    model: MultiTaskModel,
    dataset: MultiLabelDataset,
    tasks: Sequence[TaskSpec],
    groups: ArrayLike | None = None,
    *,
    batch_size: int = 1024,
    device: torch.device | str = "cpu",
    unknown_group: Any = 0,
) -> dict[str, dict[str, float]]:
    """Per binary task of ``tasks``: ``auc``, ``log_loss`` and, with ``groups`` (one group id
    per row of ``dataset``, e.g. ``group_codes(bundle, "test")``), ``gauc`` with the number of
    ``gauc_groups`` that have both classes. Unlabelled rows are left out of every number, rows of
    group ``unknown_group`` (users unseen in training) out of GAUC. Other task kinds are skipped.

    Example:
        >>> from polytask.models import build_model
        >>> tasks = [TaskSpec("click", "binary")]
        >>> model = build_model(tasks, (3,), encoder_params={"hidden": [4]})
        >>> data = MultiLabelDataset(torch.randn(8, 3), {"click": torch.tensor([0., 1.] * 4)})
        >>> sorted(ranking_report(model, data, tasks, groups=[1, 1, 2, 2, 3, 3, 4, 4])["click"])
        ['auc', 'gauc', 'gauc_groups', 'labelled', 'log_loss', 'positives']
    """
    binary = [t for t in tasks if t.kind == "binary"]
    predictions = decoded_predictions(
        model, dataset.inputs, binary, batch_size=batch_size, device=device
    )
    group_array = None if groups is None else np.asarray(groups).reshape(-1)
    if group_array is not None and len(group_array) != len(dataset):
        raise DataError(f"ranking_report: {len(group_array)} groups for {len(dataset)} rows")
    report: dict[str, dict[str, float]] = {}
    for task in binary:
        target = dataset.targets[task.name].reshape(-1).float().cpu().numpy()
        labelled = np.isfinite(target) & (target >= 0)
        p = predictions[task.name].float().numpy().reshape(-1)[labelled]
        y = target[labelled]
        entry: dict[str, float] = {
            "auc": auc(p, y),
            "log_loss": log_loss(p, y),
            "labelled": float(labelled.sum()),
            "positives": float((y == 1).sum()),
        }
        if group_array is not None:
            g = group_array[labelled]
            known = g != unknown_group
            value, count = _group_aucs(p[known], y[known], g[known])
            entry["gauc"] = value
            entry["gauc_groups"] = float(count)
        report[task.name] = entry
    return report
