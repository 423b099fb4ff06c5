"""Image inputs: folders of PNG/JPEG files read with Pillow and per-channel normalisation.

* ``load_image`` / ``read_image_folder``: every file listed in a labels CSV, converted to
  grayscale or RGB and resized to one size, as float32 ``[C, H, W]`` in ``[0, 1]``; a missing
  or unreadable file raises ``DataError`` naming it (dataset ``image-folder``).
* ``ChannelNormalizer`` (preprocessor ``channel_norm``): per-channel mean and standard
  deviation over the training images (the usual image normalisation; per-pixel statistics, the
  ``standardize`` default, would tie a pixel's scale to its position and fight augmentation).

Train-time augmentation runs inside the model (``polytask.models.augment.ImageAugment``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

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
