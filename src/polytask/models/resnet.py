"""ResNet-18/34/50 (He, Zhang, Ren & Sun, "Deep Residual Learning for Image Recognition", CVPR
2016) in torchvision's layout and parameter names, so that a torchvision or timm checkpoint loads
as it is: ``conv1``, ``bn1``, ``layer1.0.conv1`` … ``layer4.1.bn2``, ``downsample.0/1``; the
ImageNet classifier ``fc`` is not part of the encoder (its keys are ignored when loading).

Our own module definition (no torchvision). ``weights: PATH`` reads a ``.pth`` state dict (with
``torch.load(..., weights_only=True)``) or a ``.safetensors`` file; the first missing, mis-shaped
or unexpected key is a one-line ``ConfigError``.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from polytask.errors import ConfigError
from polytask.models.encoders import ENCODERS
from polytask.models.transfer import Backbone, ImageInput
from polytask.models.weights import load_weights_into, read_state_dict

__all__ = ["BasicBlock", "Bottleneck", "TorchvisionResNet", "resnet18", "resnet34", "resnet50"]


def _downsample(c_in: int, c_out: int, stride: int) -> nn.Module | None:
    if stride == 1 and c_in == c_out:
        return None
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
    )


class BasicBlock(nn.Module):
    """Two 3×3 convolutions and a shortcut (ResNet-18/34)."""

    expansion = 1

    def __init__(self, c_in: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = _downsample(c_in, planes, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn2(self.conv2(self.bn1(self.conv1(x)).relu()))
        shortcut = x if self.downsample is None else self.downsample(x)
        return (out + shortcut).relu()  # type: ignore[no-any-return]


class Bottleneck(nn.Module):
    """1×1 reduce, 3×3 (carrying the stride, as torchvision's "ResNet v1.5"), 1×1 expand ×4, and
    a shortcut (ResNet-50)."""

    expansion = 4

    def __init__(self, c_in: int, planes: int, stride: int) -> None:
        super().__init__()
        c_out = planes * self.expansion
        self.conv1 = nn.Conv2d(c_in, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.downsample = _downsample(c_in, c_out, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn1(self.conv1(x)).relu()
        out = self.bn2(self.conv2(out)).relu()
        out = self.bn3(self.conv3(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return (out + shortcut).relu()  # type: ignore[no-any-return]


#: blocks and how many of them in each of the four stages, by depth (torchvision's)
DEPTHS: dict[int, tuple[type[BasicBlock] | type[Bottleneck], tuple[int, ...]]] = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
}


class TorchvisionResNet(Backbone):
    """A ResNet with torchvision's module names; the encoder output is the global average of
    ``layer4`` (512 features for ResNet-18/34, 2048 for ResNet-50).

    Inputs are images in ``[0, 1]`` (grayscale repeated to 3 channels), resized to
    ``image_size`` when given and normalised with ImageNet's mean and standard deviation, as
    torchvision's and timm's ImageNet weights expect.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        *,
        depth: int,
        weights: str | None = None,
        image_size: int | None = None,
    ) -> None:
        super().__init__()
        if depth not in DEPTHS:
            raise ConfigError(f"resnet depth must be one of {sorted(DEPTHS)}, found {depth}")
        block, layers = DEPTHS[depth]
        self.prepare = ImageInput(input_shape, name=f"resnet{depth}", image_size=image_size)
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        width = 64
        for i, (planes, repeats) in enumerate(zip((64, 128, 256, 512), layers, strict=True)):
            blocks = []
            for j in range(repeats):
                blocks.append(block(width, planes, 2 if (i > 0 and j == 0) else 1))
                width = planes * block.expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.out_features = width
        if weights is not None:
            load_weights_into(self, read_state_dict(weights), source=weights, ignore=("fc.",))

    def forward(self, x: Tensor) -> Tensor:
        h = self.maxpool(self.bn1(self.conv1(self.prepare(x))).relu())
        for i in range(1, 5):
            h = getattr(self, f"layer{i}")(h)
        return h.mean(dim=(2, 3))  # type: ignore[no-any-return]


@ENCODERS.register("resnet18", "images: ResNet-18, torchvision layout; weights: a state dict")
def resnet18(
    input_shape: Sequence[int], *, weights: str | None = None, image_size: int | None = None
) -> TorchvisionResNet:
    """ResNet-18 (He et al., CVPR 2016) in torchvision's layout; ``weights``: a torchvision or
    timm state dict file (random initialisation without).

    Example:
        >>> import torch
        >>> resnet18((1, 32, 32))(torch.zeros(2, 1, 32, 32)).shape
        torch.Size([2, 512])
    """
    return TorchvisionResNet(input_shape, depth=18, weights=weights, image_size=image_size)


@ENCODERS.register("resnet34", "images: ResNet-34, torchvision layout; weights: a state dict")
def resnet34(
    input_shape: Sequence[int], *, weights: str | None = None, image_size: int | None = None
) -> TorchvisionResNet:
    """ResNet-34 (He et al., CVPR 2016) in torchvision's layout (see ``resnet18``)."""
    return TorchvisionResNet(input_shape, depth=34, weights=weights, image_size=image_size)


@ENCODERS.register("resnet50", "images: ResNet-50, torchvision layout; weights: a state dict")
def resnet50(
    input_shape: Sequence[int], *, weights: str | None = None, image_size: int | None = None
) -> TorchvisionResNet:
    """ResNet-50 (He et al., CVPR 2016; torchvision's v1.5, the stride on the 3×3) in
    torchvision's layout (see ``resnet18``)."""
    return TorchvisionResNet(input_shape, depth=50, weights=weights, image_size=image_size)
