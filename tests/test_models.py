from __future__ import annotations

import pytest
import torch

from polytask.errors import ConfigError
from polytask.models import ENCODERS, HardSharing, build_model
from polytask.tasks import TaskSpec

TASKS = [
    TaskSpec("c", "multiclass", num_classes=4),
    TaskSpec("b", "binary"),
    TaskSpec("m", "multilabel", num_classes=3),
    TaskSpec("r", "regression"),
    TaskSpec("v", "regression", num_classes=2),
]
SHAPES = {"c": (6, 4), "b": (6,), "m": (6, 3), "r": (6,), "v": (6, 2)}


@pytest.mark.parametrize(
    ("encoder", "input_shape", "params"),
    [
        ("mlp", (5,), {"hidden": [8, 8]}),
        ("cnn", (1, 12, 10), {"channels": [4, 8], "out_features": 16}),
        ("resnet", (3, 9, 9), {"channels": [4, 8]}),
    ],
)
def test_every_encoder_gives_task_outputs_and_gradients(encoder, input_shape, params) -> None:
    model = build_model(TASKS, input_shape, encoder=encoder, encoder_params=params, head="mlp")
    out = model(torch.randn(6, *input_shape))
    assert {k: tuple(v.shape) for k, v in out.outputs.items()} == SHAPES
    assert out.features is not None and out.features.shape[0] == 6
    sum(o.sum() for o in out.outputs.values()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name


def test_registry_covers_encoders() -> None:
    assert {"mlp", "cnn", "resnet"} <= set(ENCODERS.names())


def test_shared_and_task_parameters_partition_the_model() -> None:
    model = build_model(TASKS[:2], (5,), encoder_params={"hidden": [8]})
    assert isinstance(model, HardSharing)
    shared = {id(p) for p in model.shared_parameters()}
    task = {id(p) for p in model.task_parameters()}
    assert shared.isdisjoint(task)
    assert shared | task == {id(p) for p in model.parameters()}
    assert shared == {id(p) for p in model.encoder.parameters()}


def test_image_encoder_rejects_flat_input() -> None:
    with pytest.raises(ConfigError, match=r"cnn encoder needs images"):
        build_model(TASKS[:1], (5,), encoder="cnn")
