"""Train-time image augmentation, run inside the model: ``ImageAugment``.

Random crop with padding, horizontal flip and a small random affine transform, as an
``nn.Module`` that acts only in training mode (``model.train()``): validation, test and
prediction see the images unchanged, and it runs on the model's device. The ``augmented``
encoder (``polytask.models.fusion``) wraps any image encoder with it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polytask.errors import ConfigError, DataError

__all__ = ["ImageAugment"]


class ImageAugment(nn.Module):
    """Random image augmentation of a batch ``[B, C, H, W]``, in training mode only.

    Per sample, independently: a random crop of the image zero-padded by ``crop_padding`` pixels
    (an integer shift of up to ±``crop_padding``), a horizontal flip with probability ``flip``,
    and a random affine map with a rotation of up to ±``rotate`` degrees, a scale factor in
    ``[1 - scale, 1 + scale]`` and a shift of up to ±``translate`` of the image size (bilinear,
    zero fill). Random numbers come from torch's global generator, which ``polytask`` seeds, so a
    run is reproducible. In evaluation mode (``model.eval()``) the input is returned unchanged.

    Example:
        >>> aug = ImageAugment(crop_padding=2, flip=0.5, rotate=10)
        >>> x = torch.rand(4, 1, 8, 8)
        >>> aug(x).shape, torch.equal(aug.eval()(x), x)
        (torch.Size([4, 1, 8, 8]), True)
    """

    def __init__(
        self,
        *,
        crop_padding: int = 0,
        flip: float = 0.0,
        rotate: float = 0.0,
        scale: float = 0.0,
        translate: float = 0.0,
    ) -> None:
        super().__init__()
        problems = []
        if crop_padding < 0:
            problems.append(f"crop_padding must be >= 0, found {crop_padding}")
        if not 0.0 <= flip <= 1.0:
            problems.append(f"flip (a probability) must be in [0, 1], found {flip}")
        if not 0.0 <= rotate <= 180.0:
            problems.append(f"rotate (degrees) must be in [0, 180], found {rotate}")
        if not 0.0 <= scale < 1.0:
            problems.append(f"scale must be in [0, 1), found {scale}")
        if not 0.0 <= translate <= 1.0:
            problems.append(
                f"translate (a fraction of the size) must be in [0, 1], found {translate}"
            )
        if problems:
            raise ConfigError("augment: " + "; ".join(problems))
        self.crop_padding = int(crop_padding)
        self.flip = float(flip)
        self.rotate = float(rotate)
        self.scale = float(scale)
        self.translate = float(translate)

    def extra_repr(self) -> str:
        return (
            f"crop_padding={self.crop_padding}, flip={self.flip}, rotate={self.rotate}, "
            f"scale={self.scale}, translate={self.translate}"
        )

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return x
        if x.dim() != 4:
            raise DataError(f"augment: needs images [B, C, H, W], found shape {tuple(x.shape)}")
        if self.crop_padding > 0:
            x = self._random_crop(x)
        if self.flip > 0:
            flipped = torch.rand(x.shape[0], device=x.device) < self.flip
            x = torch.where(flipped[:, None, None, None], x.flip(-1), x)
        if self.rotate > 0 or self.scale > 0 or self.translate > 0:
            x = self._random_affine(x)
        return x

    def _random_crop(self, x: Tensor) -> Tensor:
        b, _, h, w = x.shape
        p = self.crop_padding
        padded = F.pad(x, (p, p, p, p))
        top = torch.randint(0, 2 * p + 1, (b,), device=x.device)
        left = torch.randint(0, 2 * p + 1, (b,), device=x.device)
        rows = (top[:, None] + torch.arange(h, device=x.device))[:, :, None]  # [B, H, 1]
        cols = (left[:, None] + torch.arange(w, device=x.device))[:, None, :]  # [B, 1, W]
        batch = torch.arange(b, device=x.device)[:, None, None]
        return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)

    def _random_affine(self, x: Tensor) -> Tensor:
        b = x.shape[0]

        def uniform(limit: float) -> Tensor:
            return (torch.rand(b, device=x.device) * 2 - 1) * limit

        angle = uniform(self.rotate * math.pi / 180.0)
        factor = 1.0 + uniform(self.scale)
        cos, sin = torch.cos(angle) / factor, torch.sin(angle) / factor
        # affine_grid works in normalised coordinates [-1, 1]: a shift of t·size is 2t
        theta = torch.stack(
            [
                torch.stack([cos, -sin, uniform(2 * self.translate)], dim=1),
                torch.stack([sin, cos, uniform(2 * self.translate)], dim=1),
            ],
            dim=1,
        ).to(x.dtype)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
