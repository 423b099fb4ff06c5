"""Transfer learning: backbones that start from pretrained weights, and the controls over them.

A ``Backbone`` is an encoder whose weights may come pretrained (``efficientnet_lite0``,
``resnet18/34/50``, ``hf``). The controls (``model.transfer`` in a run's YAML) act on every
backbone of a model:

* ``freeze``: ``all`` (a linear probe: only the heads train), ``none``, or ``until:<module>``
  (every parameter registered before that module is frozen; the module and those after it
  train: ``until:layer3`` trains ``layer3``, ``layer4``).
* ``unfreeze_at_epoch``: linear probe first, fine-tuning from that epoch on (``Unfreeze``, an
  epoch-start hook of the Trainer).
* ``backbone_lr_ratio``: the backbone's learning rate as a fraction of ``optimizer.lr``
  (``parameter_groups``).
* BatchNorm layers whose parameters are frozen stay in evaluation mode (their running
  statistics are part of the pretrained weights), whatever ``model.train()`` says.

``ImageInput`` puts images in the form a pretrained image backbone expects: three channels
(grayscale repeated), an optional resize, and normalisation with the statistics the backbone was
trained with (ImageNet's mean and standard deviation).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from polytask.errors import ConfigError

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Backbone",
    "ImageInput",
    "Unfreeze",
    "apply_freeze",
    "backbones",
    "parameter_groups",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Backbone(nn.Module):
    """Base class of encoders that may start from pretrained weights: ``freeze(spec)`` and
    frozen BatchNorm kept in evaluation mode.

    Example:
        >>> class Tiny(Backbone):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.stem, self.bn = nn.Linear(2, 2), nn.BatchNorm1d(2)
        ...         self.top = nn.Linear(2, 2)
        >>> m = Tiny()
        >>> m.freeze("until:top")
        >>> [n for n, p in m.named_parameters() if p.requires_grad]
        ['top.weight', 'top.bias']
        >>> m.train().bn.training  # frozen BatchNorm stays in evaluation mode
        False
    """

    def freeze(self, spec: str) -> None:
        """Freeze ``all`` parameters, ``none``, or those registered before the module named
        in ``until:<module>`` (a dotted name, e.g. ``layer3`` or ``_blocks.10``)."""
        if spec in ("all", "none"):
            self.requires_grad_(spec == "none")
        elif spec.startswith("until:"):
            self._freeze_until(spec.removeprefix("until:"))
        else:
            raise ConfigError(f"freeze must be all, none or until:<module>, found {spec!r}")
        self.train(self.training)

    def _freeze_until(self, name: str) -> None:
        modules = dict(self.named_modules())
        first = {id(p) for p in modules[name].parameters()} if name and name in modules else set()
        if not first:
            known = [n for n, m in self.named_children() if any(True for _ in m.parameters())]
            raise ConfigError(
                f"no module {name!r} with parameters in {type(self).__name__}; its "
                f"top-level modules: {', '.join(known)} (nested ones by dotted name)"
            )
        frozen = True
        for p in self.parameters():
            frozen = frozen and id(p) not in first
            p.requires_grad_(not frozen)

    def train(self, mode: bool = True) -> Backbone:
        super().train(mode)
        if mode:
            for module in self.modules():
                if isinstance(module, _BatchNorm) and not any(
                    p.requires_grad for p in module.parameters(recurse=False)
                ):
                    module.eval()
        return self


class ImageInput(nn.Module):
    """``[B, C, H, W]`` (or ``[B, H, W]``, or flat ``[B, C·H·W]``) images in ``[0, 1]`` to what
    a pretrained backbone expects: 3 channels (grayscale repeated), resized to
    ``image_size × image_size`` (bilinear; ``None`` keeps the size) and normalised with
    ``mean``/``std``. Its buffers are not part of the state dict (checkpoint keys stay the
    backbone's own).

    Example:
        >>> prep = ImageInput((1, 8, 8), name="example", image_size=16)
        >>> prep(torch.zeros(2, 64)).shape
        torch.Size([2, 3, 16, 16])
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        *,
        name: str,
        image_size: int | None = None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        shape = tuple(int(s) for s in input_shape)
        if len(shape) == 2:
            shape = (1, *shape)
        if len(shape) != 3 or shape[0] not in (1, 3):
            raise ConfigError(
                f"{name} encoder needs images [1 or 3 channels, height, width], found input "
                f"shape {tuple(input_shape)}"
            )
        if image_size is not None and image_size < 16:
            raise ConfigError(f"{name} encoder: image_size must be at least 16, found {image_size}")
        self.shape, self.image_size = shape, image_size
        self.mean: Tensor
        self.std: Tensor
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        x = x.reshape(x.shape[0], *self.shape).float()
        if self.shape[0] == 1:
            x = x.expand(-1, 3, -1, -1)
        if self.image_size is not None and self.shape[1:] != (self.image_size,) * 2:
            size = (self.image_size, self.image_size)
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return (x - self.mean) / self.std


def backbones(model: nn.Module) -> list[Backbone]:
    """The outermost ``Backbone`` modules of ``model`` (one per encoder copy)."""
    found: list[Backbone] = []
    inside: set[int] = set()
    for module in model.modules():
        if isinstance(module, Backbone) and id(module) not in inside:
            found.append(module)
            inside.update(id(m) for m in module.modules())
    return found


def apply_freeze(model: nn.Module, spec: str, *, encoder: str = "encoder") -> None:
    """``Backbone.freeze(spec)`` on every backbone of ``model``; a model without one is a
    ``ConfigError`` (only pretrained backbones can be frozen)."""
    found = backbones(model)
    if not found and spec != "none":
        raise ConfigError(
            f"the {encoder!r} encoder is not a pretrained backbone "
            "(efficientnet_lite0, resnet18, resnet34, resnet50, hf); nothing to freeze"
        )
    for backbone in found:
        backbone.freeze(spec)


def parameter_groups(
    model: nn.Module,
    others: Iterable[nn.Parameter] = (),
    *,
    lr: float,
    backbone_lr_ratio: float = 1.0,
    keep_frozen: bool = False,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups: the rest of ``model`` and ``others`` (e.g. the balancer's
    parameters) at ``lr`` first, then the backbones at ``lr * backbone_lr_ratio``. Frozen
    backbone parameters are included when ``keep_frozen`` (they will be unfrozen later; an
    optimizer skips parameters without gradient), left out otherwise.

    Example:
        >>> class Net(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.encoder, self.head = Backbone(), nn.Linear(2, 1)
        ...         self.encoder.body = nn.Linear(2, 2)
        >>> groups = parameter_groups(Net(), lr=0.1, backbone_lr_ratio=0.1)
        >>> [(len(g["params"]), round(g["lr"], 3)) for g in groups]
        [(2, 0.1), (2, 0.01)]
    """
    inside = {id(p) for b in backbones(model) for p in b.parameters()}
    backbone = [
        p for b in backbones(model) for p in b.parameters() if p.requires_grad or keep_frozen
    ]
    rest = [p for p in (*model.parameters(), *others) if id(p) not in inside and p.requires_grad]
    groups = [{"params": rest, "lr": lr}]
    if backbone:
        groups.append({"params": backbone, "lr": lr * backbone_lr_ratio})
    return groups


class Unfreeze:
    """An epoch-start hook: from epoch ``at_epoch`` on, every backbone of ``model`` trains
    (linear probe, then fine-tuning). Returns whether it changed anything, so the loop knows
    to re-read which parameters train."""

    def __init__(self, model: nn.Module, at_epoch: int) -> None:
        self.model, self.at_epoch = model, at_epoch

    def __call__(self, epoch: int) -> bool:
        if epoch < self.at_epoch:
            return False
        changed = False
        for backbone in backbones(self.model):
            if not all(p.requires_grad for p in backbone.parameters()):
                backbone.freeze("none")
                changed = True
        return changed
