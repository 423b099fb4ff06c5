"""Device selection: ``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` — nothing else is hard-coded."""

from __future__ import annotations

import torch

from polytask.errors import ConfigError


def resolve_device(spec: str = "auto") -> torch.device:
    """The ``torch.device`` for ``spec``; a CUDA request without CUDA is a ``ConfigError``.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"train.device: {spec!r} requested but CUDA is not available here")
        device = torch.device(spec)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(
                f"train.device: {spec!r} requested but only {torch.cuda.device_count()} "
                "CUDA device(s) exist"
            )
        return device
    raise ConfigError(f"train.device: unknown device {spec!r}; valid: auto, cpu, cuda, cuda:N")
