"""Dense (per-pixel) task kinds: their label masks, losses, predictions and metrics.

``polytask.tasks.TaskSpec`` delegates its three dense kinds here. Head outputs are
``(batch, channels, height, width)``; targets are

* ``segmentation``: ``int64`` class per pixel ``(batch, height, width)``, ``-1`` = ignored;
* ``depth``: ``float32`` ``(batch, 1, height, width)``, valid where finite and ``> 0`` (the
  preprocessed NYUv2/Cityscapes maps store 0 where the sensor has no depth);
* ``normals``: ``float32`` unit vectors ``(batch, 3, height, width)``, valid where finite and
  non-zero.

Losses average over valid pixels only: cross-entropy, L1 on depth, ``1 − cos`` between the
normalised prediction and the target normal. Metrics are the ones of the MTAN/LibMTL NYUv2
tables: mIoU and pixel accuracy; absolute and relative depth error; mean and median angle error
and the share of pixels within 11.25°, 22.5° and 30°.

Example:
    >>> out = torch.zeros(1, 3, 2, 2)
    >>> target = torch.tensor([[[0.0, 1.0], [0.0, 0.0]]]).unsqueeze(0).expand(1, 3, 2, 2)
    >>> loss, count = dense_loss("normals", out, target.clone())
    >>> int(count)  # one pixel has a non-zero normal
    1
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric, classification

DENSE_KINDS: tuple[str, ...] = ("segmentation", "depth", "normals")

#: metric name → higher is better, per dense kind (all of them are the defaults)
DENSE_METRICS: dict[str, dict[str, bool]] = {
    "segmentation": {"miou": True, "pixel_accuracy": True},
    "depth": {"abs_err": False, "rel_err": False},
    "normals": {
        "mean_angle": False,
        "median_angle": False,
        "within_11_25": True,
        "within_22_5": True,
        "within_30": True,
    },
}
#: the angle thresholds (degrees) of the ``within_*`` normal metrics
ANGLE_THRESHOLDS: dict[str, float] = {"within_11_25": 11.25, "within_22_5": 22.5, "within_30": 30.0}
#: channels of a dense head, per kind (segmentation: its number of classes)
DENSE_CHANNELS: dict[str, int | None] = {"segmentation": None, "depth": 1, "normals": 3}


def dense_problems(kind: str, num_classes: int) -> list[str]:
    """What is wrong with ``num_classes`` for a dense ``kind``, as readable sentences."""
    wanted = DENSE_CHANNELS[kind]
    if wanted is None:
        return [] if num_classes >= 2 else ["a segmentation task needs num_classes >= 2"]
    if num_classes != wanted:
        return [f"a {kind} task has num_classes {wanted} (its channels)"]
    return []


def dense_label_mask(kind: str, target: Tensor) -> Tensor:
    """Boolean mask of valid pixels, ``(batch, height, width)``."""
    if kind == "segmentation":
        return target >= 0
    finite = torch.isfinite(target).all(dim=1)
    if kind == "depth":
        return finite & (torch.nan_to_num(target[:, 0]) > 0)
    return finite & (torch.nan_to_num(target).abs().sum(dim=1) > 0)


def dense_loss(
    kind: str, output: Tensor, target: Tensor, scale: tuple[float, float] | None = None
) -> tuple[Tensor, Tensor]:
    """(mean loss over valid pixels, number of valid pixels), both tensors; exactly 0 with a
    zero count when no pixel is valid. With a depth ``scale`` ``(mean, std)`` the head predicts
    standardised depth: the L1 loss is taken against ``(target − mean) / std``."""
    mask = dense_label_mask(kind, target)
    count = mask.sum()
    if kind == "segmentation":
        total = F.cross_entropy(output, target, ignore_index=-1, reduction="sum")
        return total / count.clamp_min(1).to(total.dtype), count
    clean = torch.where(torch.isfinite(target), target, torch.zeros_like(target))
    if kind == "depth":
        truth = clean[:, 0] if scale is None else (clean[:, 0] - scale[0]) / scale[1]
        per = (output[:, 0] - truth).abs()
    else:
        per = 1.0 - F.cosine_similarity(output, clean, dim=1, eps=1e-8)
    per = torch.where(mask, per, torch.zeros_like(per))
    return per.sum() / count.clamp_min(1).to(per.dtype), count


def dense_decode(kind: str, output: Tensor, scale: tuple[float, float] | None = None) -> Tensor:
    """Head output → prediction: class probabilities per pixel, depth (in the targets' units:
    ``output · std + mean`` with a depth ``scale``), or unit normals."""
    if kind == "segmentation":
        return output.softmax(dim=1)
    if kind == "normals":
        return F.normalize(output, dim=1, eps=1e-8)
    if scale is not None:
        return output * scale[1] + scale[0]
    return output


def depth_target_scale(target: Tensor, *, chunk: int = 64) -> tuple[Tensor, Tensor]:
    """(mean, standard deviation) of the valid depths of ``target`` ``[N, 1, H, W]`` as
    one-element float64 tensors, accumulated ``chunk`` samples at a time (a full NYUv2 split
    is not copied). No valid pixel: ``(0, 1)``.

    Example:
        >>> mean, std = depth_target_scale(torch.tensor([[[[1.0, 3.0, 0.0]]]]))  # 0: no depth
        >>> float(mean), float(std)
        (2.0, 1.0)
    """
    total = torch.zeros((), dtype=torch.float64)
    squares = torch.zeros((), dtype=torch.float64)
    count = 0
    for start in range(0, len(target), chunk):
        part = target[start : start + chunk]
        values = part[:, 0][dense_label_mask("depth", part)].double()
        total += values.sum()
        squares += (values**2).sum()
        count += values.numel()
    if count == 0:
        return torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    mean = total / count
    variance = (squares / count - mean**2).clamp_min(0.0)
    return mean.reshape(1), variance.sqrt().reshape(1)


def build_dense_metric(kind: str, name: str, num_classes: int) -> Metric:
    """A fresh torchmetrics ``Metric`` named ``name`` of dense ``kind``."""
    if name == "miou":
        return classification.MulticlassJaccardIndex(num_classes, average="macro", ignore_index=-1)
    if name == "pixel_accuracy":
        return classification.MulticlassAccuracy(num_classes, average="micro", ignore_index=-1)
    if kind == "depth":
        return DepthError(relative=name == "rel_err")
    return NormalAngleError(name)


class DepthError(Metric):
    """Mean absolute (``|p − t|``) or relative (``|p − t| / t``) depth error over valid pixels
    of the whole split (not a mean of batch means). Lower is better.

    Example:
        >>> metric = DepthError(relative=True)
        >>> metric.update(torch.tensor([[[[1.0, 3.0]]]]), torch.tensor([[[[2.0, 0.0]]]]))
        >>> float(metric.compute())  # the second pixel has no depth
        0.5
    """

    higher_is_better = False
    is_differentiable = False
    full_state_update = False

    total: Tensor
    count: Tensor

    def __init__(self, *, relative: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.relative = relative
        self.add_state("total", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        mask = dense_label_mask("depth", target)
        truth = torch.where(mask, target[:, 0], torch.ones_like(target[:, 0])).double()
        err = (preds[:, 0].double() - truth).abs()
        if self.relative:
            err = err / truth
        self.total += torch.where(mask, err, torch.zeros_like(err)).sum()
        self.count += mask.sum()

    def compute(self) -> Tensor:
        if self.count == 0:
            return torch.tensor(math.nan, dtype=torch.float64, device=self.total.device)
        return self.total / self.count


class NormalAngleError(Metric):
    """One surface-normal metric over valid pixels: ``mean_angle``, ``median_angle`` (degrees,
    from a histogram of 0.005° bins, so it sums across processes) or ``within_11_25`` /
    ``within_22_5`` / ``within_30`` (percent of pixels within that angle of the truth).

    Example:
        >>> metric = NormalAngleError("within_30")
        >>> z, x = torch.tensor([0.0, 0.0, 1.0]), torch.tensor([1.0, 0.0, 0.0])
        >>> preds, truth = torch.stack([z, x], 1), torch.stack([z, z], 1)  # 3 × 2 pixels
        >>> metric.update(preds.reshape(1, 3, 1, 2), truth.reshape(1, 3, 1, 2))
        >>> float(metric.compute())
        50.0
    """

    higher_is_better: bool | None = None  # per name: DENSE_METRICS["normals"]
    is_differentiable = False
    full_state_update = False
    BIN_DEGREES = 0.005

    total: Tensor
    count: Tensor
    histogram: Tensor

    def __init__(self, name: str = "mean_angle", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if name not in DENSE_METRICS["normals"]:
            raise ValueError(f"unknown normal metric {name!r}")
        self.name = name
        bins = round(180.0 / self.BIN_DEGREES) if name == "median_angle" else 1
        self.add_state("total", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("histogram", torch.zeros(bins, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        mask = dense_label_mask("normals", target)
        clean = torch.where(torch.isfinite(target), target, torch.zeros_like(target)).double()
        cosine = F.cosine_similarity(preds.double(), clean, dim=1, eps=1e-12).clamp(-1.0, 1.0)
        angle = torch.rad2deg(torch.acos(cosine))[mask]
        self.count += angle.numel()
        if self.name == "mean_angle":
            self.total += angle.sum()
        elif self.name == "median_angle":
            index = (angle / self.BIN_DEGREES).long().clamp(0, self.histogram.numel() - 1)
            self.histogram += torch.bincount(index, minlength=self.histogram.numel()).double()
        else:
            self.total += (angle < ANGLE_THRESHOLDS[self.name]).sum()

    def compute(self) -> Tensor:
        if self.count == 0:
            return torch.tensor(math.nan, dtype=torch.float64, device=self.total.device)
        if self.name == "mean_angle":
            return self.total / self.count
        if self.name == "median_angle":  # the middle bin's centre: within half a bin
            cumulative = self.histogram.cumsum(0)
            middle = torch.searchsorted(cumulative, self.count / 2)
            return (middle.double() + 0.5) * self.BIN_DEGREES
        return 100.0 * self.total / self.count
