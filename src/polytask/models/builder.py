"""Build a ``MultiTaskModel`` from registry names and parameters."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from polytask.models.architectures import ARCHITECTURES, MultiTaskModel
from polytask.models.encoders import ENCODERS
from polytask.models.heads import HEADS
from polytask.tasks import TaskSpec


def build_model(
    tasks: Sequence[TaskSpec],
    input_shape: Sequence[int] | Mapping[str, Any],
    *,
    encoder: str = "mlp",
    encoder_params: Mapping[str, Any] | None = None,
    head: str = "linear",
    head_params: Mapping[str, Any] | None = None,
    architecture: str = "hard_sharing",
    architecture_params: Mapping[str, Any] | None = None,
) -> MultiTaskModel:
    """A multi-task model: ``architecture`` composing ``encoder``(s) and one ``head`` per task.

    Example:
        >>> model = build_model([TaskSpec("y", "regression")], (3,), encoder_params={"hidden": [4]})
        >>> type(model).__name__
        'HardSharing'
    """
    make_encoder_cls = ENCODERS.get(encoder)
    make_head_fn = HEADS.get(head)
    enc_kw = dict(encoder_params or {})
    head_kw = dict(head_params or {})

    # a dict input's spec (``preprocess.input_spec``) goes to the encoder as it is
    shape = input_shape if isinstance(input_shape, Mapping) else tuple(input_shape)

    def make_encoder() -> nn.Module:
        return make_encoder_cls(shape, **enc_kw)  # type: ignore[no-any-return]

    def make_head(task: TaskSpec, width: int) -> nn.Module:
        return make_head_fn(width, task, **head_kw)  # type: ignore[no-any-return]

    model = ARCHITECTURES.get(architecture)(
        tasks=list(tasks),
        make_encoder=make_encoder,
        make_head=make_head,
        **dict(architecture_params or {}),
    )
    return model  # type: ignore[no-any-return]
