"""Image inputs: folders of PNG/JPEG files read with Pillow, per-channel normalisation, and
train-time augmentation.

* ``load_image`` / ``read_image_folder``: every file listed in a labels CSV, converted to
  grayscale or RGB and resized to one size, as float32 ``[C, H, W]`` in ``[0, 1]``; a missing
  or unreadable file raises ``DataError`` naming it (dataset ``image-folder``).
* ``ChannelNormalizer`` (preprocessor ``channel_norm``): per-channel mean and standard
  deviation over the training images (the usual image normalisation; per-pixel statistics, the
  ``standardize`` default, would tie a pixel's scale to its position and fight augmentation).
* ``ImageAugment``: random crop with padding, horizontal flip and a small random affine
  transform, as an ``nn.Module`` that acts only in training mode (``model.train()``): validation,
  test and prediction see the images unchanged. The ``augmented`` encoder wraps any image encoder
  with it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polytask.data.preprocess import PREPROCESSORS
from polytask.errors import ConfigError, DataError

IMAGE_MODES = {"L": 1, "RGB": 3}


def load_image(path: str | Path, *, size: Sequence[int], mode: str = "L") -> np.ndarray:
    """float32 ``[C, H, W]`` in ``[0, 1]``: the image at ``path`` converted to ``mode`` (``L``
    grayscale or ``RGB``) and resized to ``size = (height, width)`` (bilinear). ``DataError``
    names the file when it is missing or not an image Pillow can read.

    Example:
        >>> import tempfile, os
        >>> from PIL import Image
        >>> path = os.path.join(tempfile.mkdtemp(), "a.png")
        >>> Image.new("RGB", (10, 6), (255, 0, 0)).save(path)
        >>> x = load_image(path, size=(4, 5), mode="RGB")
        >>> x.shape, x[:, 0, 0].tolist()
        ((3, 4, 5), [1.0, 0.0, 0.0])
    """
    from PIL import Image, UnidentifiedImageError

    if mode not in IMAGE_MODES:
        raise ConfigError(f"image mode must be one of {', '.join(IMAGE_MODES)}, found {mode!r}")
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such image file")
    try:
        with Image.open(path) as opened:
            image = opened.convert(mode).resize(
                (int(size[1]), int(size[0])), Image.Resampling.BILINEAR
            )
            array = np.asarray(image, dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"{path}: not a readable image ({exc})") from exc
    return array[None] if array.ndim == 2 else np.ascontiguousarray(array.transpose(2, 0, 1))


def read_image_folder(
    folder: Path, files: Sequence[str], *, size: Sequence[int], mode: str
) -> np.ndarray:
    """float32 ``[N, C, H, W]`` of ``files`` (paths relative to ``folder``)."""
    if len(size) != 2 or min(int(s) for s in size) < 1:
        raise ConfigError(f"image-folder: size must be [height, width], found {list(size)}")
    c = IMAGE_MODES.get(mode)
    if c is None:
        raise ConfigError(f"image-folder: mode must be one of {', '.join(IMAGE_MODES)}")
    out = np.empty((len(files), c, int(size[0]), int(size[1])), dtype=np.float32)
    for i, name in enumerate(files):
        out[i] = load_image(folder / str(name), size=size, mode=mode)
    return out


# ----------------------------------------------------------------------------- normalisation
@PREPROCESSORS.register("channel_norm", "images: per-channel (x - mean) / std fitted on train")
class ChannelNormalizer:
    """Images ``[N, C, H, W]`` → ``(x - mean_c) / std_c`` with one mean and standard deviation
    per channel over the training images.

    Example:
        >>> n = ChannelNormalizer()
        >>> n.fit(np.array([[[[0.0, 1.0]]], [[[1.0, 0.0]]]]))
        >>> n.transform(np.array([[[[1.0, 0.5]]]])).flatten().tolist()
        [1.0, 0.0]
    """

    kind: ClassVar[str] = "channel_norm"

    def __init__(self, mean: list[float] | None = None, std: list[float] | None = None) -> None:
        self.mean = mean
        self.std = std

    def fit(self, values: Any) -> None:
        x = np.asarray(values, dtype=np.float64)
        if x.ndim != 4:
            raise DataError(f"channel_norm: needs images [N, C, H, W], found shape {x.shape}")
        self.mean = x.mean(axis=(0, 2, 3)).tolist()
        std = x.std(axis=(0, 2, 3))
        self.std = np.where(std > 1e-12, std, 1.0).tolist()

    def transform(self, values: Any) -> Tensor:
        if self.mean is None or self.std is None:
            raise DataError("channel_norm: transform before fit")
        x = torch.as_tensor(np.asarray(values, dtype=np.float32))
        mean = torch.tensor(self.mean, dtype=torch.float32)[:, None, None]
        std = torch.tensor(self.std, dtype=torch.float32)[:, None, None]
        return (x - mean) / std

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "mean": self.mean, "std": self.std}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ChannelNormalizer:
        return cls(d["mean"], d["std"])


# ----------------------------------------------------------------------------- augmentation
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
