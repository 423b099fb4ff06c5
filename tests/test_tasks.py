from __future__ import annotations

import math

import pytest
import torch

from polytask.errors import ConfigError
from polytask.tasks import TaskSpec, compute_metrics

NAN = float("nan")


def test_multiclass_loss_averages_over_labelled_samples_only() -> None:
    task = TaskSpec("d", "multiclass", num_classes=3)
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0], [5.0, 5.0, 5.0]])
    loss, count = task.compute_loss(logits, torch.tensor([0, -1, -1]))
    expected = torch.nn.functional.cross_entropy(logits[:1], torch.tensor([0]))
    assert int(count) == 1
    assert torch.allclose(loss, expected)


@pytest.mark.parametrize(
    ("task", "output", "target"),
    [
        (TaskSpec("c", "multiclass", num_classes=3), torch.randn(4, 3), torch.full((4,), -1)),
        (TaskSpec("b", "binary"), torch.randn(4), torch.full((4,), NAN)),
        (TaskSpec("m", "multilabel", num_classes=2), torch.randn(4, 2), torch.full((4, 2), NAN)),
        (TaskSpec("r", "regression"), torch.randn(4), torch.full((4,), NAN)),
    ],
)
def test_absent_task_contributes_exactly_zero(task, output, target) -> None:
    output.requires_grad_(True)
    loss, count = task.compute_loss(output, target)
    loss.backward()
    assert loss.item() == 0.0 and int(count) == 0
    assert torch.equal(output.grad, torch.zeros_like(output))


def test_binary_minus_one_is_missing_and_multilabel_is_per_element() -> None:
    b = TaskSpec("b", "binary")
    loss, count = b.compute_loss(torch.zeros(3), torch.tensor([1.0, -1.0, NAN]))
    assert int(count) == 1 and math.isclose(loss.item(), math.log(2), rel_tol=1e-6)
    m = TaskSpec("m", "multilabel", num_classes=2)
    _, count = m.compute_loss(torch.zeros(2, 2), torch.tensor([[1.0, NAN], [0.0, 1.0]]))
    assert int(count) == 3


def test_regression_is_standardised_in_the_loss_and_decoded_back() -> None:
    task = TaskSpec("r", "regression").with_target_scale(torch.tensor([10.0]), torch.tensor([2.0]))
    # target 14 standardises to (14 - 10) / 2 = 2; output 0 → squared error 4
    loss, _ = task.compute_loss(torch.zeros(1), torch.tensor([14.0]))
    assert loss.item() == pytest.approx(4.0)
    assert task.decode(torch.tensor([2.0])).item() == pytest.approx(14.0)


def test_metrics_skip_missing_labels() -> None:
    task = TaskSpec("c", "multiclass", num_classes=2)
    metrics = task.make_metrics()
    # two labelled samples, both right; the unlabelled one is predicted wrong on purpose
    logits = torch.tensor([[3.0, 0.0], [0.0, 3.0], [3.0, 0.0]])
    task.update_metrics(metrics, logits, torch.tensor([0, 1, -1]))
    assert compute_metrics(metrics)["accuracy"] == 1.0
    reg = TaskSpec("r", "regression")
    metrics = reg.make_metrics()
    reg.update_metrics(metrics, torch.tensor([1.0, 2.0, 9.0]), torch.tensor([1.0, 4.0, NAN]))
    # errors 0 and 2 → MAE 1, RMSE sqrt(2)
    values = compute_metrics(metrics)
    assert values["mae"] == pytest.approx(1.0)
    assert values["rmse"] == pytest.approx(math.sqrt(2))


def test_metric_without_data_is_nan_and_directions() -> None:
    task = TaskSpec("r", "regression")
    assert math.isnan(compute_metrics(task.make_metrics())["rmse"])
    assert not task.higher_is_better("rmse") and task.higher_is_better("r2")


def test_bad_specs_name_the_problem() -> None:
    with pytest.raises(ConfigError, match="unknown kind"):
        TaskSpec("x", "ranking")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="num_classes >= 2"):
        TaskSpec("x", "multiclass")
    with pytest.raises(ConfigError, match="does not apply to regression"):
        TaskSpec("x", "regression", loss="bce")
    with pytest.raises(ConfigError, match="metric 'auroc' does not apply"):
        TaskSpec("x", "regression", metrics=("auroc",))


def test_round_trip_dict() -> None:
    task = TaskSpec("r", "regression", metrics=("mae",), target_mean=(1.0,), target_std=(2.0,))
    assert TaskSpec.from_dict(task.to_dict()) == task


def test_class_weights_weight_the_loss_by_hand() -> None:
    # multiclass: weights (1, 3); one sample of class 1 with logits 0 → CE = log 2, weighted 3×
    task = TaskSpec("c", "multiclass", num_classes=2, class_weights=(1.0, 3.0))
    loss, count = task.compute_loss(torch.zeros(2, 2), torch.tensor([1, -1]))
    assert int(count) == 1 and loss.item() == pytest.approx(3 * math.log(2))
    # binary: (negative 0.5, positive 2); logits 0 → each BCE = log 2; mean of 0.5 and 2 weights
    b = TaskSpec("b", "binary", class_weights=(0.5, 2.0))
    loss, _ = b.compute_loss(torch.zeros(2), torch.tensor([0.0, 1.0]))
    assert loss.item() == pytest.approx((0.5 + 2.0) * math.log(2) / 2)
    with pytest.raises(ConfigError, match="class_weights needs 3 values"):
        TaskSpec("c", "multiclass", num_classes=3, class_weights=(1.0, 2.0))


def test_class_balanced_weights_formulas() -> None:
    from polytask.tasks import class_balanced_weights

    # inverse: 1/30 and 1/10, normalised to mean 1 → 0.5 and 1.5
    assert class_balanced_weights([30, 10]) == (0.5, 1.5)
    # effective number (Cui et al. 2019) with β = 0.5: (1-β)/(1-β^n) = 0.5/0.75 and 0.5/0.5
    raw = [0.5 / 0.75, 1.0]
    expected = tuple(round(w / (sum(raw) / 2), 6) for w in raw)
    assert class_balanced_weights([2, 1], method="effective", beta=0.5) == expected
    # a class never seen gets the largest weight
    assert class_balanced_weights([10, 0])[1] == class_balanced_weights([10, 0])[0]
