"""Reading pretrained weights into a module: ``.pth`` state dicts (``weights_only=True``, never a
pickle of objects) and ``.safetensors`` files, checked key by key with a one-line error naming
the first missing, mis-shaped or unexpected key.

Packaged weights (``polytask.pretrained.PACKAGED_WEIGHTS``) are converted once to
``safetensors`` in the weights cache (``polytask.pretrained.weights_cache_dir``) and read from
there afterwards.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from polytask.errors import ConfigError
from polytask.io import atomic_path
from polytask.pretrained import packaged_weights, weights_cache_dir

__all__ = ["load_weights_into", "packaged_state_dict", "read_state_dict"]

#: where a training checkpoint keeps the model's state dict, when a file holds more than that
_NESTED_KEYS = ("state_dict", "model")


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The tensors in ``path``: a ``.safetensors`` file, or a ``.pth``/``.pt``/``.bin`` state
    dict read with ``torch.load(..., weights_only=True)`` (a checkpoint holding it under
    ``state_dict`` or ``model`` works too; a ``module.`` prefix from DDP is removed)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"weights file {path}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: object = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a corrupt file or a pickle of objects: say which and why
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise ConfigError(
            f"weights file {path}: cannot read it as a state dict ({reason})"
        ) from None
    for key in _NESTED_KEYS:
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ConfigError(f"weights file {path}: not a state dict of tensors")
    return {_strip(k, "module."): v for k, v in state.items()}


def _strip(key: str, prefix: str) -> str:
    return key[len(prefix) :] if key.startswith(prefix) else key


def load_weights_into(
    module: nn.Module,
    state: Mapping[str, Tensor],
    *,
    source: str,
    ignore: Sequence[str] = (),
) -> None:
    """Copy ``state`` into ``module``; every key of the module must be in ``state`` with its
    shape, and every key of ``state`` in the module except those starting with a prefix in
    ``ignore`` (e.g. the ImageNet classifier, ``fc.``). The first mismatch is a ``ConfigError``
    naming ``source``, the key and both shapes."""
    expected = module.state_dict()
    for key, tensor in expected.items():
        if key not in state:
            raise ConfigError(
                f"{source}: missing key {key!r} (shape {tuple(tensor.shape)}); "
                f"is it a checkpoint of this architecture?"
            )
        found = state[key]
        if tuple(found.shape) != tuple(tensor.shape):
            raise ConfigError(
                f"{source}: key {key!r} has shape {tuple(found.shape)}, expected "
                f"{tuple(tensor.shape)}"
            )
    for key in state:
        if key not in expected and not key.startswith(tuple(ignore)):
            raise ConfigError(f"{source}: unexpected key {key!r} (not a parameter of this model)")
    module.load_state_dict({k: state[k] for k in expected}, strict=True)


def packaged_state_dict(name: str) -> dict[str, Tensor]:
    """The state dict of the packaged backbone ``name``, read from its ``safetensors`` copy in
    the weights cache; the first call converts the package's ``.pth`` file (read with
    ``weights_only=True``). An unwritable cache only costs the conversion on every call."""
    from safetensors.torch import load_file, save_file

    original = packaged_weights(name)
    cached = weights_cache_dir() / f"{name}.safetensors"
    if cached.is_file():
        return dict(load_file(str(cached)))
    state = read_state_dict(original)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(cached) as temporary:
            save_file({k: v.contiguous() for k, v in state.items()}, str(temporary))
    except OSError:
        pass
    return state
