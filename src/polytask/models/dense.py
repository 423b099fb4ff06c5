"""Dense prediction: an encoder that keeps the image's resolution and per-pixel task heads.

``dense_cnn`` (in ``ENCODERS``) is a small encoder–decoder in the spirit of SegNet (Badrinarayanan,
Kendall & Cipolla, TPAMI 2017) and of the dilated backbones of the MTAN/LibMTL NYUv2 setups: two
stride-2 stages, dilated residual blocks at a quarter of the resolution (a wide receptive field
without losing more resolution), then two upsampling stages joined to the encoder's features of
the same size. Its output is a feature map ``[B, out_features, H, W]`` at the input's size.

``dense`` (in ``HEADS``) is one decoder head per task: a 3×3 conv-BN-ReLU block and a 1×1
convolution to the task's channels (classes, 1 for depth, 3 for normals). With the
``hard_sharing`` architecture this is the usual shared-encoder, per-task-decoder model.

Example:
    >>> from polytask.models.builder import build_model
    >>> from polytask.tasks import TaskSpec
    >>> tasks = [TaskSpec("seg", "segmentation", num_classes=4), TaskSpec("depth", "depth")]
    >>> model = build_model(tasks, (3, 16, 20), encoder="dense_cnn", head="dense",
    ...                     encoder_params={"channels": [8, 8, 8], "out_features": 8})
    >>> out = model(torch.zeros(2, 3, 16, 20)).outputs
    >>> tuple(out["seg"].shape), tuple(out["depth"].shape)
    ((2, 4, 16, 20), (2, 1, 16, 20))
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polytask.dense_tasks import DENSE_KINDS
from polytask.errors import ConfigError
from polytask.models.architectures import (
    ARCHITECTURES,
    EncoderFactory,
    HeadFactory,
    MultiTaskModel,
    MultiTaskOutput,
)
from polytask.models.encoders import ENCODERS, _image_shape
from polytask.models.heads import HEADS
from polytask.models.mtan import _attention_mask, _conv_block
from polytask.tasks import TaskSpec

__all__ = ["DenseAttentionBranch", "DenseEncoder", "DenseHead", "DenseMTAN"]


def _conv_bn_relu(
    in_channels: int, channels: int, *, stride: int = 1, dilation: int = 1
) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(
            in_channels,
            channels,
            3,
            stride=stride,
            padding=dilation,
            dilation=dilation,
            bias=False,
        ),
        nn.BatchNorm2d(channels),
        nn.ReLU(),
    )


class DilatedResidual(nn.Module):
    """Two dilated 3×3 conv-BN blocks with an identity shortcut (same size in and out)."""

    def __init__(self, channels: int, dilation: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _conv_bn_relu(channels, channels, dilation=dilation),
            nn.Conv2d(channels, channels, 3, padding=dilation, dilation=dilation, bias=False),
            nn.BatchNorm2d(channels),
        )

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x + self.body(x))


@ENCODERS.register(
    "dense_cnn", "encoder-decoder keeping the input resolution (dense tasks), dilated middle"
)
class DenseEncoder(nn.Module):
    """Full-resolution features ``[B, out_features, H, W]`` for per-pixel heads.

    Args:
        input_shape: ``(channels, height, width)`` (or ``(height, width)``) of the images.
        channels: widths at full, half and quarter resolution.
        dilations: one dilated residual block per value, at quarter resolution.
        out_features: channels of the output feature map.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        *,
        channels: Sequence[int] = (32, 64, 96),
        dilations: Sequence[int] = (1, 2, 4),
        out_features: int = 32,
    ) -> None:
        super().__init__()
        c, h, w = _image_shape("dense_cnn", input_shape)
        if len(channels) != 3:
            raise ConfigError(
                f"encoder_params.channels: dense_cnn needs 3 widths (full, 1/2, 1/4 "
                f"resolution), found {list(channels)}"
            )
        full, half, quarter = (int(v) for v in channels)
        self._image = (c, h, w)
        self.stem = _conv_bn_relu(c, full)
        self.down1 = _conv_bn_relu(full, half, stride=2)
        self.down2 = _conv_bn_relu(half, quarter, stride=2)
        self.middle = nn.Sequential(*(DilatedResidual(quarter, int(d)) for d in dilations))
        self.up1 = _conv_bn_relu(quarter + half, half)
        self.up2 = _conv_bn_relu(half + full, out_features)
        self.out_features = out_features
        #: channels of the outputs of ``stages``
        self.stage_channels = [full, half, quarter, half, out_features]

    def stages(self, x: Tensor) -> list[Tensor]:
        """The output of every stage: full, 1/2, 1/4 resolution (after the dilated blocks),
        then 1/2 and full resolution again; the last one is ``forward``'s."""
        s1 = self.stem(x.reshape(x.shape[0], *self._image))
        s2 = self.down1(s1)
        s3 = self.middle(self.down2(s2))
        u2 = self.up1(torch.cat([_resize(s3, s2), s2], dim=1))
        u1 = self.up2(torch.cat([_resize(u2, s1), s1], dim=1))
        return [s1, s2, s3, u2, u1]

    def forward(self, x: Tensor) -> Tensor:
        return self.stages(x)[-1]


def _resize(x: Tensor, like: Tensor) -> Tensor:
    """``x`` resized bilinearly to ``like``'s height and width."""
    if x.shape[-2:] == like.shape[-2:]:
        return x
    return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)


class DenseHead(nn.Module):
    """A per-pixel decoder head: 3×3 conv-BN-ReLU (``hidden`` channels), then a 1×1 conv to
    ``task.output_dim`` channels."""

    def __init__(self, in_features: int, task: TaskSpec, *, hidden: int = 32) -> None:
        super().__init__()
        if task.kind not in DENSE_KINDS:
            raise ConfigError(
                f"head: 'dense' predicts per pixel; task {task.name!r} is {task.kind} "
                f"(dense kinds: {', '.join(DENSE_KINDS)})"
            )
        self.body = _conv_bn_relu(in_features, hidden)
        self.out = nn.Conv2d(hidden, task.output_dim, 1)

    def forward(self, features: Tensor) -> Tensor:
        if features.dim() != 4:
            raise ConfigError(
                f"head: 'dense' needs a feature map [B, C, H, W] (an encoder such as dense_cnn), "
                f"found shape {tuple(features.shape)}"
            )
        return self.out(self.body(features))  # type: ignore[no-any-return]


@HEADS.register("dense", "per-pixel decoder head (conv block + 1x1 conv) for dense tasks")
def dense_head(in_features: int, task: TaskSpec, *, hidden: int = 32) -> DenseHead:
    """One per-pixel decoder head per task (``hidden`` channels)."""
    return DenseHead(in_features, task, hidden=hidden)


class DenseAttentionBranch(nn.Module):
    """One task's MTAN attention over the ``dense_cnn`` stages (Liu, Johns & Davison, CVPR
    2019): at stage ``j`` a mask from ``[s_j, t_{j-1}]`` selects ``â_j = a_j ⊙ s_j``, and
    ``t_j`` is a conv block on ``â_j`` resized to the next stage (down or up); the last ``â_J``
    is a full-resolution feature map for the task's dense head."""

    def __init__(self, channels: Sequence[int]) -> None:
        super().__init__()
        self.masks = nn.ModuleList(
            _attention_mask(c if j == 0 else 2 * c, c) for j, c in enumerate(channels)
        )
        self.blocks = nn.ModuleList(_conv_block(c, c_next) for c, c_next in pairwise(channels))

    def forward(self, shared: Sequence[Tensor]) -> Tensor:
        previous: Tensor | None = None
        attended = shared[0]
        for j, features in enumerate(shared):
            inputs = features if previous is None else torch.cat([features, previous], dim=1)
            attended = self.masks[j](inputs) * features
            if j < len(self.blocks):
                previous = _resize(self.blocks[j](attended), shared[j + 1])
        return attended


@ARCHITECTURES.register(
    "dense_mtan", "dense_cnn + per-task attention on its feature maps (MTAN, CVPR 2019)"
)
class DenseMTAN(MultiTaskModel):
    """MTAN for dense tasks: the shared ``dense_cnn`` encoder–decoder and, per task, a
    ``DenseAttentionBranch`` over its five stages whose full-resolution output the task's
    ``dense`` head reads. ``shared_parameters()`` are the encoder's; ``features`` the shared
    last stage ``[B, C, H, W]``.

    Example:
        >>> tasks = [TaskSpec("seg", "segmentation", num_classes=3), TaskSpec("d", "depth")]
        >>> model = DenseMTAN(tasks=tasks,
        ...     make_encoder=lambda: DenseEncoder((3, 8, 8), channels=(4, 4, 4), out_features=4),
        ...     make_head=lambda task, width: dense_head(width, task, hidden=4))
        >>> tuple(model(torch.zeros(2, 3, 8, 8)).outputs["seg"].shape)
        (2, 3, 8, 8)
    """

    def __init__(
        self, *, tasks: Sequence[TaskSpec], make_encoder: EncoderFactory, make_head: HeadFactory
    ) -> None:
        super().__init__()
        self.tasks = list(tasks)
        encoder = make_encoder()
        if not isinstance(encoder, DenseEncoder):
            raise ConfigError(
                f"model.encoder: dense_mtan needs the dense_cnn encoder, found "
                f"{type(encoder).__name__}"
            )
        self.encoder = encoder
        channels = encoder.stage_channels
        self.branches = nn.ModuleDict({t.name: DenseAttentionBranch(channels) for t in tasks})
        self.heads = nn.ModuleDict({t.name: make_head(t, encoder.out_features) for t in tasks})

    def forward(self, x: Tensor) -> MultiTaskOutput:
        shared = self.encoder.stages(x)
        outputs = {name: head(self.branches[name](shared)) for name, head in self.heads.items()}
        return MultiTaskOutput(outputs, shared[-1])

    def shared_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.encoder.parameters() if p.requires_grad]
