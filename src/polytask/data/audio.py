"""Audio inputs: WAV files read with the standard library, waveform scaling, log-mel features.

* ``read_wav`` / ``write_wav``: PCM WAV files (8, 16, 24 or 32 bit, any channel count) with the
  standard library's ``wave`` module, nothing else to install; a bad file raises ``DataError``
  naming it.
* ``WaveformScaler`` (preprocessor ``waveform``): divides waveforms by one RMS level measured on
  the training split, and tells encoders the block's ``sample_rate`` through ``spec()``.
* ``mel_filterbank`` and ``log_mel``: log-mel spectrograms with ``torch.stft`` and a triangular
  mel filterbank computed here (HTK mel scale). They run inside the ``audio_cnn`` encoder, on the
  model's device, so a dataset stores raw waveforms and prediction takes raw waveforms.
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


# ----------------------------------------------------------------------------- log-mel
def hz_to_mel(hz: Tensor | float) -> Tensor:
    """HTK mel scale: ``2595 · log10(1 + f / 700)``."""
    return 2595.0 * torch.log10(1.0 + torch.as_tensor(hz, dtype=torch.float64) / 700.0)


def mel_to_hz(mel: Tensor) -> Tensor:
    """Inverse of ``hz_to_mel``."""
    return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)


def mel_filterbank(
    *, sample_rate: int, n_fft: int, n_mels: int, f_min: float = 0.0, f_max: float | None = None
) -> Tensor:
    """Triangular mel filters ``[n_fft // 2 + 1, n_mels]`` (float32): filter ``m`` rises
    linearly from mel point ``m`` to ``m + 1`` and falls to ``m + 2``, with ``n_mels + 2``
    points equally spaced on the HTK mel scale between ``f_min`` and ``f_max`` (default: the
    Nyquist frequency). Peak height 1, no area normalisation.

    Example:
        >>> fb = mel_filterbank(sample_rate=8000, n_fft=256, n_mels=20)
        >>> tuple(fb.shape), bool((fb >= 0).all()), float(fb.max()) <= 1.0
        ((129, 20), True, True)
    """
    f_max = sample_rate / 2 if f_max is None else f_max
    if not 0 <= f_min < f_max <= sample_rate / 2:
        raise DataError(
            f"mel filterbank: need 0 <= f_min < f_max <= sample_rate / 2, found {f_min}, {f_max}"
        )
    freqs = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)
    points = mel_to_hz(torch.linspace(hz_to_mel(f_min), hz_to_mel(f_max), n_mels + 2).double())
    lower, centre, upper = points[:-2], points[1:-1], points[2:]
    rising = (freqs[:, None] - lower) / (centre - lower)
    falling = (upper - freqs[:, None]) / (upper - centre)
    return torch.clamp(torch.minimum(rising, falling), min=0.0).float()


def log_mel(
    waveform: Tensor,
    filterbank: Tensor,
    *,
    n_fft: int,
    hop_length: int,
    window: Tensor | None = None,
    eps: float = 1e-6,
) -> Tensor:
    """``log(mel power + eps)`` ``[B, n_mels, frames]`` of waveforms ``[B, samples]``: a centred
    short-time Fourier transform (Hann window), the power spectrum, the mel filterbank.

    Example:
        >>> rate, fft = 8000, 256
        >>> fb = mel_filterbank(sample_rate=rate, n_fft=fft, n_mels=20)
        >>> tone = torch.sin(2 * math.pi * 1000 * torch.arange(4000) / rate)
        >>> log_mel(tone[None], fb, n_fft=fft, hop_length=128).shape
        torch.Size([1, 20, 32])
    """
    if window is None:
        window = torch.hann_window(n_fft, device=waveform.device, dtype=waveform.dtype)
    spec = torch.stft(
        waveform.float(),
        n_fft=n_fft,
        hop_length=hop_length,
        window=window.float(),
        center=True,
        return_complex=True,
    )
    power = spec.real**2 + spec.imag**2  # [B, freqs, frames]
    mel = torch.einsum("bft,fm->bmt", power, filterbank.to(power.dtype))
    return torch.log(mel + eps)


def tone(frequency: float, *, seconds: float, sample_rate: int) -> np.ndarray:
    """A unit-amplitude sine wave (for tests and examples)."""
    t = np.arange(round(seconds * sample_rate)) / sample_rate
    return np.sin(2 * math.pi * frequency * t).astype(np.float32)
