"""MTAN: shared backbone and per-task attention branches."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from polytask.errors import ConfigError
from polytask.models.cross_stitch import encoder_stages
from polytask.models.encoders import CNNEncoder, MLPEncoder, ResNetEncoder
from polytask.models.heads import linear_head
from polytask.models.mtan import MTAN
from polytask.tasks import TaskSpec

TASKS = [TaskSpec("a", "binary"), TaskSpec("b", "multiclass", num_classes=3)]


def head(task: TaskSpec, width: int) -> nn.Module:
    return linear_head(width, task)


def test_mtan_needs_an_image_encoder() -> None:
    with pytest.raises(ConfigError, match=r"^mtan: needs an image encoder \(cnn or resnet\)"):
        MTAN(tasks=TASKS, make_encoder=lambda: MLPEncoder((4,), hidden=(3,)), make_head=head)


@pytest.mark.parametrize(
    ("make", "input_shape"),
    [
        (lambda: CNNEncoder((1, 8, 8), channels=(3, 4), out_features=5), (1, 8, 8)),
        (lambda: CNNEncoder((2, 3, 3), channels=(3, 4), out_features=5), (2, 3, 3)),  # no pool
        (lambda: ResNetEncoder((1, 7, 7), channels=(3, 4, 5)), (1, 7, 7)),
    ],
)
def test_attention_masks_and_features_follow_the_backbone(make, input_shape) -> None:
    torch.manual_seed(0)
    encoders: list[nn.Module] = []

    def make_encoder() -> nn.Module:
        encoders.append(make())
        return encoders[-1]

    model = MTAN(tasks=TASKS, make_encoder=make_encoder, make_head=head).eval()
    x = torch.randn(3, *input_shape)
    out = model(x)
    # features: every backbone stage's output, flattened and joined
    stage_outputs, hidden = [], x
    for stage in encoder_stages(encoders[0], spatial=True):
        hidden = stage(hidden)
        stage_outputs.append(hidden)
    torch.testing.assert_close(out.features, torch.cat([s.flatten(1) for s in stage_outputs], 1))
    for name in ("a", "b"):
        masks = out.extras["attention"][name]
        assert [m.shape for m in masks] == [s.shape for s in stage_outputs]
        assert all(((m > 0) & (m < 1)).all() for m in masks)
    assert out.outputs["a"].shape == (3,) and out.outputs["b"].shape == (3, 3)
    assert {id(p) for p in model.shared_parameters()} == {
        id(p) for p in model.backbone.parameters()
    }


def test_unused_encoder_parts_are_left_out() -> None:
    model = MTAN(
        tasks=TASKS,
        make_encoder=lambda: CNNEncoder((1, 8, 8), channels=(3, 4), out_features=5),
        make_head=head,
    )
    assert not any(
        name.startswith("backbone") and "project" in name for name, _ in model.named_parameters()
    )
    branch = model.branches["a"]
    assert branch.project.out_features == 5  # the encoder's out_features feeds the head
    assert [b[0].in_channels for b in branch.blocks] == [3]
    assert [m[0].in_channels for m in branch.masks] == [3, 8]


def test_each_task_reads_the_shared_features_through_its_own_attention() -> None:
    torch.manual_seed(0)
    model = MTAN(
        tasks=TASKS,
        make_encoder=lambda: CNNEncoder((1, 8, 8), channels=(3, 4), out_features=5),
        make_head=head,
    )
    out = model(torch.randn(4, 1, 8, 8))
    out.outputs["a"].sum().backward()
    assert all(p.grad is not None for p in model.backbone.parameters())
    assert all(p.grad is None for p in model.branches["b"].parameters())
