"""Ranking evaluation: AUC, GAUC, log-loss and the log_loss metric of binary tasks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchmetrics.classification import BinaryAUROC

from polytask.data.batches import MultiLabelDataset
from polytask.errors import DataError
from polytask.evaluate.ranking import auc, gauc, log_loss, ranking_report
from polytask.models import build_model
from polytask.tasks import METRICS, BinaryLogLoss, TaskSpec, compute_metrics


def test_auc_hand_case_and_ties() -> None:
    # positives 0.35 and 0.8 against negatives 0.1 and 0.4: 3 of 4 pairs ordered
    assert auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75
    assert auc([0.5, 0.5], [0, 1]) == 0.5  # a tie counts one half
    assert math.isnan(auc([0.1, 0.2], [1, 1]))


def test_auc_matches_torchmetrics() -> None:
    rng = np.random.default_rng(0)
    scores = np.round(rng.random(300), 2)  # many ties
    labels = (rng.random(300) < 0.3).astype(int)
    expected = BinaryAUROC()(torch.tensor(scores), torch.tensor(labels)).item()
    assert auc(scores, labels) == pytest.approx(expected, abs=1e-6)


def test_gauc_hand_case() -> None:
    scores = [0.9, 0.2, 0.1, 0.3, 0.3, 0.5, 0.4, 0.6, 0.7, 0.2]
    labels = [1, 0, 0, 1, 0, 1, 0, 1, 0, 1]
    users = ["a", "a", "a", "b", "b", "c", "d", "d", "d", "d"]
    # a: 3 impressions, the positive (0.9) above both negatives: AUC 1
    # b: 2 impressions, positive and negative tied at 0.3: AUC 0.5
    # c: 1 impression, one class only: left out
    # d: 4 impressions, positives 0.6 and 0.2 vs negatives 0.4 and 0.7:
    #    0.6 > 0.4, 0.6 < 0.7, 0.2 < 0.4, 0.2 < 0.7 -> AUC 1/4
    # GAUC = (3·1 + 2·0.5 + 4·0.25) / (3 + 2 + 4) = 5 / 9
    assert gauc(scores, labels, users) == pytest.approx(5 / 9)
    # the unweighted mean would be (1 + 0.5 + 0.25) / 3 = 7/12: the weighting matters
    assert gauc(scores, labels, users) != pytest.approx(7 / 12)
    assert math.isnan(gauc([0.1, 0.2], [1, 1], [0, 1]))
    with pytest.raises(DataError, match="2 groups"):
        gauc([0.1, 0.2, 0.3], [0, 1, 0], [0, 1])


def test_gauc_differs_from_auc_when_users_differ() -> None:
    # user 1 always scores high, user 2 low; within each user the order is perfect, but across
    # users positives of user 2 rank below negatives of user 1
    scores = [0.9, 0.8, 0.2, 0.1]
    labels = [1, 0, 1, 0]
    users = [1, 1, 2, 2]
    assert gauc(scores, labels, users) == 1.0
    assert auc(scores, labels) == 0.75


def test_log_loss_hand_case() -> None:
    # -(ln 0.5 + ln 0.9 + ln(1 - 0.2)) / 3
    expected = -(math.log(0.5) + math.log(0.9) + math.log(0.8)) / 3
    assert log_loss([0.5, 0.9, 0.2], [1, 1, 0]) == pytest.approx(expected)
    assert math.isfinite(log_loss([0.0, 1.0], [1, 0]))  # clipped, not infinite


def test_log_loss_metric_is_registered_lower_is_better_and_ignores_missing() -> None:
    assert METRICS["binary"]["log_loss"] is False
    task = TaskSpec("click", "binary", metrics=("auroc", "log_loss"))
    assert task.higher_is_better("log_loss") is False
    metrics = task.make_metrics()
    logits = torch.tensor([0.0, 2.0, -1.0, 3.0])
    target = torch.tensor([1.0, 1.0, 0.0, float("nan")])  # last one unlabelled
    task.update_metrics(metrics, logits, target)
    values = compute_metrics(metrics)
    p = torch.sigmoid(logits[:3]).numpy()
    assert values["log_loss"] == pytest.approx(log_loss(p, [1, 1, 0]), rel=1e-6)
    empty = BinaryLogLoss()
    empty.update(torch.tensor([0.3]), torch.tensor([-1]))
    assert math.isnan(float(empty.compute()))


def test_ranking_report_skips_unlabelled_rows_unknown_users_and_other_kinds() -> None:
    torch.manual_seed(0)
    tasks = [TaskSpec("click", "binary"), TaskSpec("price", "regression")]
    model = build_model(tasks, (3,), encoder_params={"hidden": [4]})
    x = torch.randn(12, 3)
    click = torch.tensor([0.0, 1.0] * 5 + [float("nan")] * 2)
    data = MultiLabelDataset(x, {"click": click, "price": torch.randn(12)})
    groups = np.array([1, 1, 2, 2, 3, 3, 0, 0, 4, 4, 5, 5])  # 0 = unseen user
    report = ranking_report(model, data, tasks, groups)
    assert set(report) == {"click"}
    entry = report["click"]
    assert entry["labelled"] == 10 and entry["positives"] == 5
    assert entry["gauc_groups"] == 4  # users 1-4; 0 is unknown, 5 is unlabelled
    with torch.no_grad():
        p = torch.sigmoid(model(x).outputs["click"]).numpy()
    keep = [0, 1, 2, 3, 4, 5, 8, 9]
    assert entry["gauc"] == pytest.approx(gauc(p[keep], click.numpy()[keep], groups[keep]))
    assert entry["auc"] == pytest.approx(auc(p[:10], click.numpy()[:10]))
    assert "gauc" not in ranking_report(model, data, tasks)["click"]
