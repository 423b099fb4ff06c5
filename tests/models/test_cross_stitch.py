"""Cross-stitch networks and ``encoder_stages``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from polytask.errors import ConfigError
from polytask.models.cross_stitch import CrossStitch, CrossStitchUnit, encoder_stages
from polytask.models.encoders import CNNEncoder, MLPEncoder, ResNetEncoder
from polytask.models.heads import linear_head
from polytask.tasks import TaskSpec

TASKS = [TaskSpec("a", "binary"), TaskSpec("b", "multiclass", num_classes=3)]


def head(task: TaskSpec, width: int) -> nn.Module:
    return linear_head(width, task)


@pytest.mark.parametrize(
    ("encoder", "input_shape", "num_stages", "num_spatial"),
    [
        (MLPEncoder((2, 3), hidden=(5, 4, 3)), (2, 3), 3, None),
        (MLPEncoder((6,), hidden=(5, 4), batch_norm=True, dropout=0.1), (6,), 2, None),
        (CNNEncoder((1, 8, 8), channels=(3, 4), out_features=5), (1, 8, 8), 3, 2),
        (CNNEncoder((2, 3, 3), channels=(3, 4, 2), out_features=5), (2, 3, 3), 4, 3),  # no pool
        (CNNEncoder((8, 8), channels=(3,), out_features=5), (8, 8), 2, 1),  # no channel axis
        (ResNetEncoder((1, 8, 8), channels=(3, 4)), (1, 8, 8), 3, 3),
        (ResNetEncoder((3, 6, 6), channels=(3, 4), blocks_per_stage=2), (3, 6, 6), 5, 5),
    ],
)
def test_stages_compose_to_the_encoder(encoder, input_shape, num_stages, num_spatial) -> None:
    encoder.eval()
    stages = encoder_stages(encoder)
    assert len(stages) == num_stages
    x = torch.randn(3, *input_shape)
    torch.testing.assert_close(nn.Sequential(*stages)(x), encoder(x))
    # the stages hold the encoder's own parameters
    assert {id(p) for s in stages for p in s.parameters()} == {id(p) for p in encoder.parameters()}
    if num_spatial is None:
        with pytest.raises(ConfigError, match=r"needs an image encoder .* found MLPEncoder"):
            encoder_stages(encoder, spatial=True)
    else:
        spatial = encoder_stages(encoder, spatial=True)
        assert len(spatial) == num_spatial
        assert nn.Sequential(*spatial)(x).dim() == 4


def test_mlp_stages_end_at_activations() -> None:
    enc = MLPEncoder((4,), hidden=(5, 3), batch_norm=True, dropout=0.5)
    kinds = [[type(m).__name__ for m in stage] for stage in encoder_stages(enc)]
    assert kinds == [
        ["Flatten", "Linear", "BatchNorm1d", "ReLU", "Dropout"],
        ["Linear", "BatchNorm1d", "ReLU", "Dropout"],
    ]


def test_unknown_encoders_are_rejected() -> None:
    with pytest.raises(ConfigError, match=r"cannot split a Linear encoder into stages"):
        encoder_stages(nn.Linear(3, 4))

    class Custom(nn.Module):
        out_features = 4

        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(3, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.layer(x)

    with pytest.raises(ConfigError, match=r"^cross_stitch: cannot split a Custom encoder"):
        CrossStitch(tasks=TASKS, make_encoder=Custom, make_head=head)


@pytest.mark.parametrize(("num_tasks", "self_weight"), [(1, 0.9), (2, 0.9), (4, 0.7)])
def test_unit_initialisation(num_tasks: int, self_weight: float) -> None:
    weight = CrossStitchUnit(num_tasks, self_weight=self_weight).weight.detach()
    if num_tasks == 1:
        assert weight.tolist() == [[1.0]]
        return
    off = (1 - self_weight) / (num_tasks - 1)
    expected = torch.full((num_tasks, num_tasks), off).fill_diagonal_(self_weight)
    torch.testing.assert_close(weight, expected)
    torch.testing.assert_close(weight.sum(1), torch.ones(num_tasks))


def test_unit_mixes_the_columns() -> None:
    unit = CrossStitchUnit(3)
    with torch.no_grad():
        unit.weight.copy_(torch.arange(9.0).view(3, 3))
    columns = [torch.randn(2, 4, 5) for _ in range(3)]
    mixed = unit(columns)
    for j in range(3):
        expected = sum(unit.weight[j, k] * columns[k] for k in range(3))
        torch.testing.assert_close(mixed[j], expected)


@pytest.mark.parametrize(
    ("make", "input_shape"),
    [
        (lambda: MLPEncoder((6,), hidden=(5, 4)), (6,)),
        (lambda: CNNEncoder((1, 8, 8), channels=(3, 4), out_features=5), (1, 8, 8)),
    ],
)
def test_identity_units_give_independent_networks(make, input_shape) -> None:
    encoders: list[nn.Module] = []

    def make_encoder() -> nn.Module:
        encoders.append(make())
        return encoders[-1]

    model = CrossStitch(tasks=TASKS, make_encoder=make_encoder, make_head=head, self_weight=1.0)
    model.eval()
    x = torch.randn(3, *input_shape)
    out = model(x)
    for task, encoder in zip(TASKS, encoders, strict=True):
        torch.testing.assert_close(out.outputs[task.name], model.heads[task.name](encoder(x)))


def test_units_connect_the_columns() -> None:
    model = CrossStitch(
        tasks=TASKS, make_encoder=lambda: MLPEncoder((6,), hidden=(5, 4)), make_head=head
    )
    out = model(torch.randn(3, 6))
    assert out.features is None
    out.outputs["a"].sum().backward()  # task a's loss reaches task b's column through the units
    grad = model.columns["b"][0][1].weight.grad
    assert grad is not None and grad.abs().sum() > 0
    assert model.heads["b"].out.weight.grad is None
    shared = {id(p) for p in model.shared_parameters()}
    assert shared == {id(p) for p in model.units.parameters()}
    assert len(model.units) == 2 and model.units[0].weight.shape == (2, 2)
