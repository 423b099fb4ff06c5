"""Shared encoders: map an input batch to a feature matrix ``[B, out_features]``.

Every encoder is registered in ``ENCODERS`` by name and built as
``ENCODERS.get(name)(input_shape, **params)``; it exposes ``out_features``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from polytask.errors import ConfigError
from polytask.registry import Registry

ENCODERS: Registry = Registry("encoder", provided=("input_shape",))

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
}


def activation(name: str) -> nn.Module:
    """A fresh activation module by name (relu, gelu, silu, tanh)."""
    try:
        return _ACTIVATIONS[name]()
    except KeyError:
        raise ConfigError(
            f"unknown activation {name!r}; valid: {', '.join(sorted(_ACTIVATIONS))}"
        ) from None


def mlp_layers(
    in_features: int,
    hidden: Sequence[int],
    *,
    dropout: float = 0.0,
    activation_name: str = "relu",
    batch_norm: bool = False,
) -> nn.Sequential:
    """Linear → [BatchNorm] → activation → [Dropout] for each width in ``hidden``."""
    layers: list[nn.Module] = []
    width = in_features
    for h in hidden:
        layers.append(nn.Linear(width, h))
        if batch_norm:
            layers.append(nn.BatchNorm1d(h))
        layers.append(activation(activation_name))
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = h
    return nn.Sequential(*layers)


@ENCODERS.register("mlp", "multi-layer perceptron over flattened (tabular) features")
class MLPEncoder(nn.Module):
    """A multi-layer perceptron over the flattened input.

    Example:
        >>> enc = MLPEncoder((8,), hidden=(16, 4))
        >>> enc(torch.zeros(2, 8)).shape
        torch.Size([2, 4])
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        *,
        hidden: Sequence[int] = (256, 256),
        dropout: float = 0.0,
        activation: str = "relu",
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        if not hidden:
            raise ConfigError("mlp encoder: hidden must list at least one width")
        in_features = math.prod(input_shape)
        self.body = mlp_layers(
            in_features, hidden, dropout=dropout, activation_name=activation, batch_norm=batch_norm
        )
        self.out_features = int(hidden[-1])

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x.flatten(1))


def _image_shape(name: str, input_shape: Sequence[int]) -> tuple[int, int, int]:
    if len(input_shape) == 2:
        return (1, int(input_shape[0]), int(input_shape[1]))
    if len(input_shape) != 3:
        raise ConfigError(
            f"{name} encoder needs images [channels, height, width], found input shape "
            f"{tuple(input_shape)}"
        )
    return (int(input_shape[0]), int(input_shape[1]), int(input_shape[2]))


@ENCODERS.register("cnn", "small convolutional network for images (conv-BN-ReLU-pool blocks)")
class CNNEncoder(nn.Module):
    """Conv-BN-ReLU blocks, each followed by 2×2 max-pooling while the image is large enough,
    then global average pooling and a linear projection to ``out_features``.

    Example:
        >>> enc = CNNEncoder((1, 10, 14), channels=(8, 16), out_features=32)
        >>> enc(torch.zeros(2, 1, 10, 14)).shape
        torch.Size([2, 32])
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        *,
        channels: Sequence[int] = (32, 64),
        kernel_size: int = 3,
        out_features: int = 128,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        c, h, w = _image_shape("cnn", input_shape)
        self._image = (c, h, w)
        layers: list[nn.Module] = []
        for width in channels:
            layers += [
                nn.Conv2d(c, width, kernel_size, padding=kernel_size // 2, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(),
            ]
            if min(h, w) >= 4:
                layers.append(nn.MaxPool2d(2))
                h, w = h // 2, w // 2
            c = width
        self.features = nn.Sequential(*layers)
        self.project = nn.Sequential(
            nn.Flatten(), nn.Dropout(dropout), nn.Linear(c * h * w, out_features), nn.ReLU()
        )
        self.out_features = out_features

    def forward(self, x: Tensor) -> Tensor:
        return self.project(self.features(x.reshape(x.shape[0], *self._image)))


class _BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


@ENCODERS.register("resnet", "small residual network for images (He et al., CVPR 2016)")
class ResNetEncoder(nn.Module):
    """A small ResNet (He, Zhang, Ren & Sun, CVPR 2016): a 3×3 stem, stages of basic residual
    blocks (stride 2 between stages), global average pooling.

    Example:
        >>> enc = ResNetEncoder((1, 16, 16), channels=(8, 16))
        >>> enc(torch.zeros(2, 1, 16, 16)).shape
        torch.Size([2, 16])
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        *,
        channels: Sequence[int] = (32, 64, 128),
        blocks_per_stage: int = 1,
    ) -> None:
        super().__init__()
        c, h, w = _image_shape("resnet", input_shape)
        self._image = (c, h, w)
        self.stem = nn.Sequential(
            nn.Conv2d(c, channels[0], 3, padding=1, bias=False),
            nn.BatchNorm2d(channels[0]),
            nn.ReLU(),
        )
        blocks: list[nn.Module] = []
        width = channels[0]
        for i, out in enumerate(channels):
            for j in range(blocks_per_stage):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(_BasicBlock(width, out, stride))
                width = out
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_features = width

    def forward(self, x: Tensor) -> Tensor:
        x = self.blocks(self.stem(x.reshape(x.shape[0], *self._image)))
        return self.pool(x).flatten(1)
