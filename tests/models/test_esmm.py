"""ESMM: pCTCVR = pCTR × pCVR over the entire impression space."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from polytask.errors import ConfigError
from polytask.models.encoders import MLPEncoder
from polytask.models.esmm import ESMM, ctcvr_logit
from polytask.models.heads import linear_head
from polytask.tasks import TaskSpec

TASKS = [TaskSpec("click", "binary"), TaskSpec("conversion", "binary")]


def mlp() -> nn.Module:
    return MLPEncoder((5,), hidden=(6,))


def head(task: TaskSpec, width: int) -> nn.Module:
    return linear_head(width, task)


def grid(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    values = torch.cat([torch.linspace(-30, 30, 61), torch.tensor([-30.0, -17.3, 0.01, 29.9])])
    a, b = torch.meshgrid(values, values, indexing="ij")
    return a.flatten().to(dtype), b.flatten().to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ctcvr_logit_is_the_logit_of_the_product(dtype: torch.dtype) -> None:
    a, b = grid(dtype)
    a.requires_grad_(True)
    b.requires_grad_(True)
    logit = ctcvr_logit(a, b)
    product = torch.sigmoid(a) * torch.sigmoid(b)
    assert torch.isfinite(logit).all()
    torch.testing.assert_close(torch.sigmoid(logit), product, atol=1e-6, rtol=0)
    # relative accuracy where p is tiny or close to 1 (the log-odds themselves)
    a64, b64 = a.detach().double(), b.detach().double()
    exact = -torch.logsumexp(torch.stack([-a64, -b64, -a64 - b64]), 0)
    torch.testing.assert_close(logit.detach().double(), exact, atol=1e-4, rtol=1e-5)
    F.binary_cross_entropy_with_logits(logit, torch.ones_like(logit)).backward()
    assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()
    assert a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0


def test_ctcvr_loss_is_the_papers_loss() -> None:
    a, b = grid(torch.float64)
    keep = (a.abs() < 15) & (b.abs() < 15)  # where the naive formula is accurate
    a, b = a[keep], b[keep]
    y = (torch.arange(a.numel()) % 2).double()
    p = torch.sigmoid(a) * torch.sigmoid(b)
    naive = -(y * torch.log(p) + (1 - y) * torch.log(1 - p))
    loss = F.binary_cross_entropy_with_logits(ctcvr_logit(a, b), y, reduction="none")
    torch.testing.assert_close(loss, naive)


def test_model_outputs_ctr_and_ctcvr_logits() -> None:
    torch.manual_seed(0)
    tasks = [TaskSpec("price", "regression"), *TASKS, TaskSpec("kind", "multiclass", num_classes=4)]
    model = ESMM(tasks=tasks, make_encoder=mlp, make_head=head)
    x = torch.randn(4, 5)
    out = model(x)
    assert list(out.outputs) == ["price", "click", "conversion", "kind"]
    assert out.outputs["price"].shape == (4,) and out.outputs["kind"].shape == (4, 4)
    features = model.encoder(x)
    torch.testing.assert_close(out.features, features)
    torch.testing.assert_close(out.outputs["click"], model.ctr_tower(features))
    cvr = torch.sigmoid(model.cvr_tower(features))
    torch.testing.assert_close(out.extras["cvr"], cvr)
    torch.testing.assert_close(
        torch.sigmoid(out.outputs["conversion"]), torch.sigmoid(out.outputs["click"]) * cvr
    )
    assert set(model.heads) == {"price", "kind"}
    assert {id(p) for p in model.shared_parameters()} == {id(p) for p in model.encoder.parameters()}


def test_extreme_tower_logits_give_finite_losses_and_gradients() -> None:
    model = ESMM(tasks=TASKS, make_encoder=mlp, make_head=head)
    x = torch.randn(4, 5)
    y = {"click": torch.tensor([1.0, 0.0, 1.0, 0.0]), "conversion": torch.tensor([1.0, 0, 0, 0])}
    for ctr_bias, cvr_bias in [(30.0, 30.0), (-30.0, 30.0), (30.0, -30.0), (-30.0, -30.0)]:
        model.zero_grad()
        with torch.no_grad():
            model.ctr_tower.out.bias.fill_(ctr_bias)
            model.cvr_tower.out.bias.fill_(cvr_bias)
        out = model(x)
        losses = [t.compute_loss(out.outputs[t.name], y[t.name])[0] for t in TASKS]
        assert all(torch.isfinite(loss) for loss in losses)
        sum(losses).backward()  # type: ignore[union-attr]
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_missing_click_labels_leave_the_ctcvr_loss() -> None:
    model = ESMM(tasks=TASKS, make_encoder=mlp, make_head=head)
    out = model(torch.randn(4, 5))
    click_loss, count = TASKS[0].compute_loss(out.outputs["click"], torch.full((4,), math.nan))
    assert click_loss.item() == 0.0 and count.item() == 0
    conversion_loss, _ = TASKS[1].compute_loss(out.outputs["conversion"], torch.zeros(4))
    (click_loss + conversion_loss).backward()
    assert model.ctr_tower.out.weight.grad is not None  # pCTCVR contains pCTR
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_custom_task_names() -> None:
    tasks = [TaskSpec("ctr", "binary"), TaskSpec("ctcvr", "binary")]
    model = ESMM(tasks=tasks, make_encoder=mlp, make_head=head, ctr_task="ctr", ctcvr_task="ctcvr")
    assert set(model(torch.randn(2, 5)).outputs) == {"ctr", "ctcvr"}


def test_bad_task_names_are_reported_together() -> None:
    with pytest.raises(ConfigError) as info:
        ESMM(tasks=[TaskSpec("click", "regression")], make_encoder=mlp, make_head=head)
    assert str(info.value) == (
        "esmm: ctr_task 'click' must be a binary task, found regression; "
        "ctcvr_task 'conversion' is not one of the tasks (click)"
    )
    with pytest.raises(ConfigError, match=r"ctr_task and ctcvr_task must differ"):
        ESMM(tasks=TASKS, make_encoder=mlp, make_head=head, ctcvr_task="click")
