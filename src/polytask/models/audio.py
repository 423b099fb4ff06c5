"""Audio encoders over raw waveforms: ``LogMel`` features computed in the model (torch.stft and
our own mel filterbank, so they run on the model's device and no audio library is needed) and
the ``audio_cnn`` encoder."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from polytask.errors import ConfigError, DataError
from polytask.models.encoders import ENCODERS
from polytask.models.fusion import pick, resolve_block

__all__ = ["AudioCNNEncoder", "LogMel", "hz_to_mel", "log_mel", "mel_filterbank", "mel_to_hz"]


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


class LogMel(nn.Module):
    """Waveforms ``[B, samples]`` → log-mel spectrograms ``[B, n_mels, frames]``
    (``log_mel``); the filterbank and window are non-persistent buffers
    (rebuilt from the arguments, not stored in checkpoints).

    Example:
        >>> mel = LogMel(sample_rate=8000, n_fft=256, hop_length=128, n_mels=20)
        >>> mel(torch.zeros(2, 4000)).shape
        torch.Size([2, 20, 32])
    """

    filterbank: Tensor
    window: Tensor

    def __init__(
        self,
        *,
        sample_rate: int,
        n_fft: int,
        hop_length: int,
        n_mels: int,
        f_min: float = 0.0,
        f_max: float | None = None,
    ) -> None:
        super().__init__()
        self.n_fft = int(n_fft)
        self.hop_length = int(hop_length)
        fb = mel_filterbank(
            sample_rate=sample_rate, n_fft=n_fft, n_mels=n_mels, f_min=f_min, f_max=f_max
        )
        self.register_buffer("filterbank", fb, persistent=False)
        self.register_buffer("window", torch.hann_window(self.n_fft), persistent=False)

    def forward(self, waveform: Tensor) -> Tensor:
        return log_mel(
            waveform,
            self.filterbank,
            n_fft=self.n_fft,
            hop_length=self.hop_length,
            window=self.window,
        )


@ENCODERS.register("audio_cnn", "audio: log-mel spectrogram (torch.stft) + CNN")
class AudioCNNEncoder(nn.Module):
    """A log-mel spectrogram CNN over raw waveforms ``[samples]``.

    ``LogMel`` (a ``window_ms`` Hann window, FFT size the next power of two, hop ``hop_ms``,
    ``n_mels`` HTK mel bands up to ``f_max``) → per-band batch normalisation (a learned,
    train-fitted standardisation of each band) → optional SpecAugment masks in training mode
    (Park et al., Interspeech 2019: per sample, zero one random band of up to ``freq_mask`` mel
    bins and one span of up to ``time_mask`` frames) → conv-BN-ReLU blocks (``channels``) with
    2×2 max-pooling while the map is large enough → global mean and max pooling → a linear layer
    and ReLU to ``out_features``.

    The sample rate comes from the block's spec (the ``waveform`` preprocessor) or from
    ``sample_rate``. In a dict input, ``block`` names the audio block (by default: the only block
    with a sample rate).

    Example:
        >>> spec = {"audio": {"shape": [4000], "sample_rate": 8000}}
        >>> enc = AudioCNNEncoder(spec, channels=(4, 8), out_features=16)
        >>> enc({"audio": torch.randn(3, 4000)}).shape
        torch.Size([3, 16])
    """

    accepts_block_spec = True

    def __init__(
        self,
        input_shape: Any,
        *,
        block: str | None = None,
        sample_rate: int | None = None,
        window_ms: float = 32.0,
        hop_ms: float = 16.0,
        n_mels: int = 40,
        f_max: float | None = None,
        channels: Sequence[int] = (16, 32, 64),
        out_features: int = 64,
        dropout: float = 0.0,
        freq_mask: int = 0,
        time_mask: int = 0,
    ) -> None:
        super().__init__()
        self.block, entry = resolve_block("audio_cnn", input_shape, block, needs=["sample_rate"])
        rate = entry.get("sample_rate", sample_rate)
        if rate is None:
            raise ConfigError(
                "audio_cnn encoder: unknown sample rate: use the `waveform` preprocessor (the "
                "audio datasets do) or set `sample_rate`"
            )
        shape = entry["shape"]
        if len(shape) != 1:
            raise ConfigError(f"audio_cnn encoder needs waveforms [samples], found shape {shape}")
        if not channels:
            raise ConfigError("audio_cnn: channels must list at least one width")
        rate = int(rate)
        win = max(2, round(window_ms * rate / 1000))
        n_fft = 2 ** math.ceil(math.log2(win))
        hop = max(1, round(hop_ms * rate / 1000))
        samples = int(shape[0])
        if samples <= n_fft // 2:
            raise ConfigError(
                f"audio_cnn: waveforms of {samples} samples are shorter than half the FFT "
                f"window ({n_fft} samples at {rate} Hz)"
            )
        self.melspec = LogMel(
            sample_rate=rate, n_fft=n_fft, hop_length=hop, n_mels=n_mels, f_max=f_max
        )
        self.band_norm = nn.BatchNorm1d(n_mels)
        self.freq_mask = int(freq_mask)
        self.time_mask = int(time_mask)
        h, w = n_mels, samples // hop + 1
        layers: list[nn.Module] = []
        c = 1
        for width in channels:
            layers += [
                nn.Conv2d(c, width, 3, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(),
            ]
            if min(h, w) >= 2:
                layers.append(nn.MaxPool2d(2))
                h, w = h // 2, w // 2
            c = width
        self.features = nn.Sequential(*layers)
        self.project = nn.Sequential(nn.Dropout(dropout), nn.Linear(2 * c, out_features), nn.ReLU())
        self.out_features = int(out_features)
        self.sample_rate = rate
        self.samples = samples

    @property
    def in_features(self) -> int:
        """Width of what mixture-of-experts gates read: ``embed(x)`` for a dict input, else the
        flattened waveform."""
        return self.embed_features if self.block is not None else self.samples

    @property
    def embed_features(self) -> int:
        return int(self.melspec.filterbank.shape[1])

    def embed(self, x: Tensor | Mapping[str, Tensor]) -> Tensor:
        """A cheap summary ``[B, n_mels]`` for gates: the log-mel spectrum averaged over time."""
        waveform = pick(x, self.block, "audio_cnn")
        return self.melspec(waveform.reshape(waveform.shape[0], -1)).mean(dim=2)

    def _spec_augment(self, spec: Tensor) -> Tensor:
        b, bands, frames = spec.shape
        keep = torch.ones_like(spec, dtype=torch.bool)
        for size, extent, axis in ((self.freq_mask, bands, 1), (self.time_mask, frames, 2)):
            if size <= 0:
                continue
            width = torch.randint(0, size + 1, (b,), device=spec.device)
            start = (torch.rand(b, device=spec.device) * (extent - width + 1)).long()
            index = torch.arange(extent, device=spec.device)[None]
            inside = (index >= start[:, None]) & (index < (start + width)[:, None])  # [B, extent]
            keep &= ~(inside[:, :, None] if axis == 1 else inside[:, None, :])
        return spec * keep

    def forward(self, x: Tensor | Mapping[str, Tensor]) -> Tensor:
        waveform = pick(x, self.block, "audio_cnn")
        spec = self.band_norm(self.melspec(waveform.reshape(waveform.shape[0], -1)))
        if self.training and (self.freq_mask > 0 or self.time_mask > 0):
            spec = self._spec_augment(spec)
        maps = self.features(spec.unsqueeze(1))
        pooled = torch.cat([maps.mean(dim=(2, 3)), maps.amax(dim=(2, 3))], dim=1)
        return self.project(pooled)  # type: ignore[no-any-return]
