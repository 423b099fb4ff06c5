"""MTAN: a shared image backbone and one soft-attention network per task."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polytask.errors import ConfigError
from polytask.models.architectures import (
    ARCHITECTURES,
    EncoderFactory,
    HeadFactory,
    MultiTaskModel,
    MultiTaskOutput,
)
from polytask.models.cross_stitch import encoder_stages
from polytask.models.experts import join_features
from polytask.tasks import TaskSpec

__all__ = ["MTAN", "AttentionBranch"]


def _stage_channels(stage: nn.Module) -> int:
    """Channels of a stage's output: those of its last convolution."""
    convs = [m for m in stage.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ConfigError(f"mtan: the backbone stage {type(stage).__name__} has no convolution")
    return int(convs[-1].out_channels)


def _attention_mask(in_channels: int, channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, channels, 1),
        nn.BatchNorm2d(channels),
        nn.ReLU(),
        nn.Conv2d(channels, channels, 1),
        nn.Sigmoid(),
    )


def _conv_block(in_channels: int, channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(channels),
        nn.ReLU(),
    )


class AttentionBranch(nn.Module):
    """One task's attention network over the backbone's stage outputs ``s_1 ... s_J``.

    At stage ``j`` a mask ``a_j = sigmoid(conv1x1(relu(bn(conv1x1(input)))))`` is computed from
    ``s_1`` (``j = 1``) or ``[s_j, t_{j-1}]``, and the attended features are ``â_j = a_j ⊙ s_j``;
    below the last stage ``t_j`` is a 3×3 conv block (``C_j -> C_{j+1}`` channels) on ``â_j``,
    max-pooled to ``s_{j+1}``'s resolution. The last ``â_J`` is average-pooled and projected by a
    linear layer to ``width``.
    """

    def __init__(self, channels: Sequence[int], width: int) -> None:
        super().__init__()
        self.masks = nn.ModuleList(
            _attention_mask(c if j == 0 else 2 * c, c) for j, c in enumerate(channels)
        )
        self.blocks = nn.ModuleList(_conv_block(c, c_next) for c, c_next in pairwise(channels))
        self.project = nn.Linear(channels[-1], width)

    def forward(self, shared: Sequence[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """(the task's features ``[B, width]``, the attention mask of every stage)."""
        masks: list[Tensor] = []
        previous: Tensor | None = None
        attended = shared[0]
        for j, features in enumerate(shared):
            inputs = features if previous is None else torch.cat([features, previous], dim=1)
            mask = self.masks[j](inputs)
            masks.append(mask)
            attended = mask * features
            if j < len(self.blocks):
                previous = self.blocks[j](attended)
                size = shared[j + 1].shape[-2:]
                if previous.shape[-2:] != size:
                    previous = F.adaptive_max_pool2d(previous, size)
        return self.project(attended.mean(dim=(2, 3))), masks


@ARCHITECTURES.register(
    "mtan", "shared backbone + per-task soft attention (Liu, Johns & Davison, CVPR 2019)"
)
class MTAN(MultiTaskModel):
    """Multi-Task Attention Network (Liu, Johns & Davison, "End-to-End Multi-Task Learning with
    Attention", CVPR 2019).

    A shared backbone (``make_encoder()``, a ``cnn`` or ``resnet`` encoder split into its
    convolution stages by ``encoder_stages(..., spatial=True)``) and, per task, an
    ``AttentionBranch``: at every stage a soft attention mask selects features from the shared
    stage output, conditioned on the task's attended features of the stage before; the task's
    global-pooled last attended features are projected to the encoder's ``out_features`` and read
    by its head.

    Simplifications relative to the paper's SegNet-based network, which predicts dense maps with
    an encoder-decoder: no decoder (heads here read vectors, so the task branch ends with global
    pooling and a linear layer); one attention module per stage, reading the stage *output*
    (the paper reads a layer inside the block and masks the block's output); no batch norm before
    the mask's sigmoid; the pooling that matches the next stage's resolution is adaptive max
    pooling (the paper's 2×2 max pooling when the resolution halves). The backbone's own
    projection (cnn) or pooling (resnet) is not used.

    * ``shared_parameters()``: the backbone stages; the attention branches and the heads are
      task parameters.
    * ``features``: every backbone stage's output, flattened and joined into
      ``[B, sum_j C_j H_j W_j]`` (the branches read views of it, so it is a cut of the graph).
    * ``extras["attention"]``: ``{task: [mask of each stage, [B, C_j, H_j, W_j]]}``.

    Example:
        >>> from polytask.models.encoders import CNNEncoder
        >>> from polytask.models.heads import linear_head
        >>> tasks = [TaskSpec("a", "binary"), TaskSpec("b", "regression")]
        >>> def make_encoder():
        ...     return CNNEncoder((1, 8, 8), channels=(4, 6), out_features=5)
        >>> model = MTAN(tasks=tasks, make_encoder=make_encoder,
        ...              make_head=lambda task, width: linear_head(width, task))
        >>> out = model(torch.randn(3, 1, 8, 8))
        >>> out.outputs["a"].shape, out.features.shape, len(out.extras["attention"]["b"])
        (torch.Size([3]), torch.Size([3, 88]), 2)
    """

    def __init__(
        self,
        *,
        tasks: Sequence[TaskSpec],
        make_encoder: EncoderFactory,
        make_head: HeadFactory,
    ) -> None:
        super().__init__()
        if not tasks:
            raise ConfigError("mtan: needs at least one task")
        self.tasks = list(tasks)
        encoder = make_encoder()
        try:
            stages = encoder_stages(encoder, spatial=True)
        except ConfigError as exc:
            raise ConfigError(f"mtan: {exc}") from None
        width = getattr(encoder, "out_features", None)
        if not isinstance(width, int):
            raise ConfigError(
                f"mtan: the encoder {type(encoder).__name__} has no integer out_features"
            )
        channels = [_stage_channels(s) for s in stages]
        self.backbone = nn.ModuleList(stages)
        self.branches = nn.ModuleDict({t.name: AttentionBranch(channels, width) for t in tasks})
        self.heads = nn.ModuleDict({t.name: make_head(t, width) for t in self.tasks})

    def forward(self, x: Tensor) -> MultiTaskOutput:
        stage_outputs: list[Tensor] = []
        hidden = x
        for stage in self.backbone:
            hidden = stage(hidden)
            stage_outputs.append(hidden)
        features, views = join_features(stage_outputs)
        outputs: dict[str, Tensor] = {}
        attention: dict[str, list[Tensor]] = {}
        for name, head in self.heads.items():
            task_features, attention[name] = self.branches[name](views)
            outputs[name] = head(task_features)
        return MultiTaskOutput(outputs, features, {"attention": attention})

    def shared_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.backbone.parameters() if p.requires_grad]
