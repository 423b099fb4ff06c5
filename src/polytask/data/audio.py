"""Audio inputs: WAV files read with the standard library and waveform scaling.

* ``read_wav`` / ``write_wav``: PCM WAV files (8, 16, 24 or 32 bit, any channel count) with the
  standard library's ``wave`` module, nothing else to install; a bad file raises ``DataError``
  naming it.
* ``WaveformScaler`` (preprocessor ``waveform``): divides waveforms by one RMS level measured on
  the training split, and tells encoders the block's ``sample_rate`` through ``spec()``.

Log-mel features are computed inside the model (``polytask.models.audio``), on the model's
device, so a dataset stores raw waveforms and prediction takes raw waveforms.
"""

from __future__ import annotations

import math
import wave
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from polytask.data.preprocess import PREPROCESSORS
from polytask.errors import DataError


# ----------------------------------------------------------------------------- WAV files
def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """``(waveform, sample_rate)`` of a PCM WAV file: float32 ``[samples]`` in ``[-1, 1]``,
    channels averaged to mono. ``DataError`` names the file when it is missing, not a WAV file,
    truncated or of an unsupported sample width.

    Example:
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "a.wav")
        >>> write_wav(path, np.array([0.0, 0.5, -0.5], dtype=np.float32), 8000)
        >>> x, rate = read_wav(path)
        >>> rate, np.round(x, 3).tolist()
        (8000, [0.0, 0.5, -0.5])
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such audio file")
    try:
        with wave.open(str(path), "rb") as f:
            channels, width, rate = f.getnchannels(), f.getsampwidth(), f.getframerate()
            frames = f.getnframes()
            raw = f.readframes(frames)
    except (wave.Error, EOFError, OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable PCM WAV file ({exc})") from exc
    if width not in (1, 2, 3, 4):
        raise DataError(f"{path}: unsupported sample width of {width} bytes")
    count = len(raw) // (width * channels)
    if count < frames:
        raise DataError(f"{path}: truncated WAV file ({count} of {frames} frames)")
    raw = raw[: count * width * channels]
    if width == 1:  # unsigned 8 bit
        data = (np.frombuffer(raw, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 3:  # signed 24 bit little endian
        b = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        ints = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        ints = np.where(ints >= 1 << 23, ints - (1 << 24), ints)
        data = ints.astype(np.float32) / float(1 << 23)
    else:
        dtype = np.int16 if width == 2 else np.int32
        data = np.frombuffer(raw, dtype=f"<{np.dtype(dtype).str[1:]}").astype(np.float32)
        data /= float(1 << (8 * width - 1))
    return data.reshape(count, channels).mean(axis=1).astype(np.float32), int(rate)


def write_wav(path: str | Path, waveform: np.ndarray, sample_rate: int) -> None:
    """Write a mono float waveform (clipped to ``[-1, 1]``) as a 16-bit PCM WAV file."""
    x = np.clip(np.asarray(waveform, dtype=np.float64).reshape(-1), -1.0, 1.0)
    ints = np.round(x * 32767.0).astype("<i2")
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(int(sample_rate))
        f.writeframes(ints.tobytes())


def resample(waveform: np.ndarray, rate: int, target: int) -> np.ndarray:
    """Linear-interpolation resampling (no anti-aliasing filter: fine for speech-like signals
    whose energy lies well below the target Nyquist frequency)."""
    if rate == target:
        return waveform
    n = max(1, round(len(waveform) * target / rate))
    t = np.arange(n) * (rate / target)
    return np.interp(t, np.arange(len(waveform)), waveform).astype(np.float32)


def fit_length(waveform: np.ndarray, length: int) -> np.ndarray:
    """The first ``length`` samples, zero-padded at the end when shorter."""
    out = np.zeros(length, dtype=np.float32)
    n = min(length, len(waveform))
    out[:n] = waveform[:n]
    return out


# ----------------------------------------------------------------------------- preprocessing
@PREPROCESSORS.register("waveform", "waveforms divided by the training RMS level; knows the rate")
class WaveformScaler:
    """Waveforms ``[N, samples]`` divided by their RMS level over the training split (silent,
    i.e. missing, rows excluded), so every run sees unit-power inputs whatever the recording
    gain; ``spec()`` gives encoders the ``sample_rate``.

    Example:
        >>> s = WaveformScaler(8000)
        >>> s.fit(np.array([[0.5, -0.5], [0.0, 0.0]]))
        >>> s.transform(np.array([[0.25, 0.0]])).tolist(), s.spec()
        ([[0.5, 0.0]], {'sample_rate': 8000})
    """

    kind: ClassVar[str] = "waveform"

    def __init__(self, sample_rate: int, rms: float | None = None) -> None:
        self.sample_rate = int(sample_rate)
        self.rms = rms

    def fit(self, values: Any) -> None:
        x = np.asarray(values, dtype=np.float64).reshape(len(values), -1)
        heard = x[np.abs(x).max(axis=1) > 0] if len(x) else x
        rms = float(np.sqrt(np.mean(heard**2))) if heard.size else 1.0
        self.rms = rms if rms > 1e-12 else 1.0

    def transform(self, values: Any) -> Tensor:
        if self.rms is None:
            raise DataError("waveform: transform before fit")
        x = np.asarray(values, dtype=np.float32)
        return torch.from_numpy(np.ascontiguousarray(x / np.float32(self.rms)))

    def spec(self) -> dict[str, Any]:
        return {"sample_rate": self.sample_rate}

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "sample_rate": self.sample_rate, "rms": self.rms}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WaveformScaler:
        return cls(d["sample_rate"], d["rms"])


def tone(frequency: float, *, seconds: float, sample_rate: int) -> np.ndarray:
    """A unit-amplitude sine wave (for tests and examples)."""
    t = np.arange(round(seconds * sample_rate)) / sample_rate
    return np.sin(2 * math.pi * frequency * t).astype(np.float32)
