"""Tasks: what each head predicts, its loss over labelled samples only, and its metrics.

Labels may be missing for any sample and any task:

* ``multiclass``: an ``int64`` class index per sample, ``-1`` when missing;
* ``binary``: a ``float32`` 0/1 per sample, ``NaN`` (or ``-1``) when missing;
* ``multilabel``: a ``float32`` 0/1 per sample and label, ``NaN`` (or ``-1``) when missing;
* ``regression``: a ``float32`` value (or vector) per sample, ``NaN`` when missing.

A task's loss averages over its labelled samples (elements for multilabel and vector regression)
only; a task with no labelled sample in a batch contributes exactly zero and is *absent* that step.

Example:
    >>> import torch
    >>> task = TaskSpec("digit", "multiclass", num_classes=3)
    >>> loss, count = task.compute_loss(torch.zeros(2, 3), torch.tensor([-1, -1]))
    >>> float(loss), int(count)
    (0.0, 0)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric, MetricCollection, classification, regression

from polytask.dense_tasks import (
    DENSE_KINDS,
    DENSE_METRICS,
    build_dense_metric,
    dense_decode,
    dense_label_mask,
    dense_loss,
    dense_problems,
)
from polytask.errors import ConfigError

TaskKind = Literal[
    "binary", "multiclass", "multilabel", "regression", "segmentation", "depth", "normals"
]
TASK_KINDS: tuple[str, ...] = get_args(TaskKind)

#: loss name → (kinds it applies to)
LOSSES: dict[str, tuple[str, ...]] = {
    "cross_entropy": ("multiclass",),
    "bce": ("binary", "multilabel"),
    "mse": ("regression",),
    "l1": ("regression",),
    "huber": ("regression",),
    "pixel_cross_entropy": ("segmentation",),
    "masked_l1": ("depth",),
    "cosine": ("normals",),
}
DEFAULT_LOSS: dict[str, str] = {
    "multiclass": "cross_entropy",
    "binary": "bce",
    "multilabel": "bce",
    "regression": "mse",
    "segmentation": "pixel_cross_entropy",
    "depth": "masked_l1",
    "normals": "cosine",
}
#: metric name → higher is better, per kind (the first ones are the defaults)
METRICS: dict[str, dict[str, bool]] = {
    "binary": {
        "accuracy": True,
        "auroc": True,
        "f1": True,
        "precision": True,
        "recall": True,
        "log_loss": False,
    },
    "multiclass": {
        "accuracy": True,
        "macro_f1": True,
        "macro_precision": True,
        "macro_recall": True,
    },
    "multilabel": {
        "accuracy": True,
        "macro_f1": True,
        "auroc": True,
        "macro_precision": True,
        "macro_recall": True,
    },
    "regression": {"rmse": False, "mae": False, "r2": True},
    **DENSE_METRICS,
}
DEFAULT_METRICS: dict[str, tuple[str, ...]] = {
    "binary": ("accuracy", "auroc", "f1", "log_loss"),
    "multiclass": ("accuracy", "macro_f1"),
    "multilabel": ("accuracy", "macro_f1", "auroc"),
    "regression": ("rmse", "mae", "r2"),
    **{kind: tuple(names) for kind, names in DENSE_METRICS.items()},
}


@dataclass(frozen=True)
class TaskSpec:
    """One task of a multi-task model.

    Args:
        name: the task's name (a key of the model's output and of each batch's targets).
        kind: ``binary``, ``multiclass``, ``multilabel``, ``regression`` or a dense (per-pixel)
            kind ``segmentation``, ``depth``, ``normals`` (``polytask.dense_tasks``).
        num_classes: classes (multiclass, segmentation), labels (multilabel) or outputs
            (regression); 1 for binary and depth, 3 for normals.
        loss: a name from ``LOSSES`` valid for ``kind``; the kind's default when ``None``.
        metrics: names from ``METRICS[kind]``; the kind's defaults when ``None``.
        weight: a fixed factor on this task's loss (the balancer's weights multiply it).
        target_mean, target_std: regression and depth targets are standardised with these
            (fitted on the training split; depth: on its valid pixels) inside the loss;
            predictions and metrics are in the original units.
        class_weights: per-class loss weights for skewed classes (multiclass: one per class;
            binary: ``(negative, positive)``), e.g. from ``class_balanced_weights``.
    """

    name: str
    kind: TaskKind
    num_classes: int = 1
    loss: str | None = None
    metrics: tuple[str, ...] | None = None
    weight: float = 1.0
    target_mean: tuple[float, ...] | None = field(default=None)
    target_std: tuple[float, ...] | None = field(default=None)
    class_weights: tuple[float, ...] | None = field(default=None)

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ConfigError(f"task {self.name!r}: " + "; ".join(problems))

    def problems(self) -> list[str]:
        """Every inconsistency in this spec, as readable sentences."""
        out: list[str] = []
        if self.kind not in TASK_KINDS:
            out.append(f"unknown kind {self.kind!r}; valid: {', '.join(TASK_KINDS)}")
            return out
        if self.kind in DENSE_KINDS:
            out.extend(dense_problems(self.kind, self.num_classes))
        if self.kind == "multiclass" and self.num_classes < 2:
            out.append("a multiclass task needs num_classes >= 2")
        if self.kind == "binary" and self.num_classes != 1:
            out.append("a binary task has num_classes 1")
        if self.num_classes < 1:
            out.append("num_classes must be >= 1")
        if self.class_weights is not None:
            wanted = 2 if self.kind == "binary" else self.num_classes
            if self.kind not in ("binary", "multiclass"):
                out.append("class_weights apply to binary and multiclass tasks only")
            elif len(self.class_weights) != wanted:
                out.append(f"class_weights needs {wanted} values, found {len(self.class_weights)}")
        if self.loss is not None and self.kind not in LOSSES.get(self.loss, ()):
            valid = [name for name, kinds in LOSSES.items() if self.kind in kinds]
            out.append(
                f"loss {self.loss!r} does not apply to {self.kind}; valid: {', '.join(valid)}"
            )
        for metric in self.metrics or ():
            if metric not in METRICS[self.kind]:
                out.append(
                    f"metric {metric!r} does not apply to {self.kind}; "
                    f"valid: {', '.join(METRICS[self.kind])}"
                )
        return out

    # ----------------------------------------------------------------- shapes and names
    @property
    def output_dim(self) -> int:
        """Width of the head's last layer."""
        return 1 if self.kind == "binary" else self.num_classes

    @property
    def loss_name(self) -> str:
        return self.loss or DEFAULT_LOSS[self.kind]

    @property
    def metric_names(self) -> tuple[str, ...]:
        return tuple(self.metrics) if self.metrics else DEFAULT_METRICS[self.kind]

    def higher_is_better(self, metric: str) -> bool:
        """Whether a larger value of ``metric`` is better (for early stopping and Δm%)."""
        if metric == "loss":
            return False
        return METRICS[self.kind][metric]

    def with_target_scale(self, mean: Tensor, std: Tensor) -> TaskSpec:
        """A copy whose regression targets are standardised by ``mean`` and ``std``."""
        return replace(
            self,
            target_mean=tuple(float(v) for v in mean.reshape(-1)),
            target_std=tuple(float(v) if v > 0 else 1.0 for v in std.reshape(-1)),
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``TaskSpec(**d)`` rebuilds it)."""
        d: dict[str, Any] = {"name": self.name, "kind": self.kind, "num_classes": self.num_classes}
        for key in ("loss", "metrics", "target_mean", "target_std", "class_weights"):
            value = getattr(self, key)
            if value is not None:
                d[key] = list(value) if isinstance(value, tuple) else value
        if self.weight != 1.0:
            d["weight"] = self.weight
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TaskSpec:
        d = dict(d)
        for key in ("metrics", "target_mean", "target_std", "class_weights"):
            if d.get(key) is not None:
                d[key] = tuple(d[key])
        return cls(**d)

    # ----------------------------------------------------------------- labels and loss
    def label_mask(self, target: Tensor) -> Tensor:
        """Boolean mask of labelled entries: per sample, or per element for multilabel and
        vector regression, per pixel for the dense kinds (``polytask.dense_tasks``)."""
        if self.kind in DENSE_KINDS:
            return dense_label_mask(self.kind, target)
        if self.kind == "multiclass":
            return target >= 0
        if self.kind == "regression":
            return torch.isfinite(target)
        return torch.isfinite(target) & (target >= 0)

    def _scale(self, like: Tensor) -> tuple[Tensor | float, Tensor | float]:
        """(mean, std) of the regression targets: Python floats for one output (no host-to-
        device copy), else tensors cached per device and dtype."""
        assert self.target_mean is not None and self.target_std is not None
        if like.dim() == 1:
            return self.target_mean[0], self.target_std[0]
        cache: dict[Any, tuple[Tensor, Tensor]] = self.__dict__.setdefault("_scale_cache", {})
        key = (like.device, like.dtype)
        if key not in cache:
            cache[key] = (
                torch.tensor(self.target_mean, dtype=like.dtype, device=like.device),
                torch.tensor(self.target_std, dtype=like.dtype, device=like.device),
            )
        return cache[key]

    def _dense_scale(self) -> tuple[float, float] | None:
        """(mean, std) of a depth task's targets as Python floats (no device copy), or None."""
        if self.kind != "depth" or self.target_mean is None or self.target_std is None:
            return None
        return self.target_mean[0], self.target_std[0]

    def _class_weights(self, like: Tensor) -> Tensor | None:
        """The class weights as a tensor, cached per device and dtype (no copy per step)."""
        if self.class_weights is None:
            return None
        cache: dict[Any, Tensor] = self.__dict__.setdefault("_weight_cache", {})
        key = (like.device, like.dtype)
        if key not in cache:
            cache[key] = torch.tensor(self.class_weights, dtype=like.dtype, device=like.device)
        return cache[key]

    def _standardise(self, target: Tensor) -> Tensor:
        if self.target_mean is None or self.target_std is None:
            return target
        mean, std = self._scale(target)
        return (target - mean) / std

    def compute_loss(self, output: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """(mean loss over labelled entries, number of labelled entries).

        Both are tensors (no host synchronisation); the loss is exactly 0 with a zero count
        when nothing is labelled.
        """
        if self.kind in DENSE_KINDS:
            return dense_loss(self.kind, output, target, self._dense_scale())
        mask = self.label_mask(target)
        count = mask.sum()
        weights = self._class_weights(output)
        if self.kind == "multiclass":  # one fused kernel: unlabelled (-1) rows are ignored
            total = F.cross_entropy(
                output, target, weight=weights, ignore_index=-1, reduction="sum"
            )
            return total / count.clamp_min(1).to(total.dtype), count
        if self.kind in ("binary", "multilabel"):
            clean = torch.where(mask, target, torch.zeros_like(target))
            sample_weight = mask.to(output.dtype)
            if weights is not None:  # (negative, positive) class weights
                sample_weight = sample_weight * torch.where(clean > 0.5, weights[1], weights[0])
            total = F.binary_cross_entropy_with_logits(
                output, clean, weight=sample_weight, reduction="sum"
            )
            return total / count.clamp_min(1).to(total.dtype), count
        else:
            clean = torch.where(mask, self._standardise(target), torch.zeros_like(target))
            if self.loss_name == "mse":
                per = F.mse_loss(output, clean, reduction="none")
            elif self.loss_name == "l1":
                per = F.l1_loss(output, clean, reduction="none")
            else:
                per = F.huber_loss(output, clean, reduction="none")
        per = torch.where(mask, per, torch.zeros_like(per))
        return per.sum() / count.clamp_min(1).to(per.dtype), count

    # ----------------------------------------------------------------- predictions
    def decode(self, output: Tensor) -> Tensor:
        """Head output → prediction: probabilities (binary, multilabel: per label; multiclass:
        per class) or values in the targets' original units (regression); per pixel for the
        dense kinds (``polytask.dense_tasks.dense_decode``)."""
        if self.kind in DENSE_KINDS:
            return dense_decode(self.kind, output, self._dense_scale())
        if self.kind == "multiclass":
            return output.softmax(dim=-1)
        if self.kind in ("binary", "multilabel"):
            return output.sigmoid()
        if self.target_mean is None or self.target_std is None:
            return output
        mean, std = self._scale(output)
        return output * std + mean

    # ----------------------------------------------------------------- metrics
    def make_metrics(self) -> MetricCollection:
        """Fresh torchmetrics (DDP-aware) for this task; update them with
        ``update_metrics``."""
        metrics: dict[str, Metric | MetricCollection] = {}
        n = self.num_classes
        for name in self.metric_names:
            metrics[name] = _build_metric(self.kind, name, n)
        return MetricCollection(metrics)

    def update_metrics(self, metrics: MetricCollection, output: Tensor, target: Tensor) -> None:
        """Feed one batch (raw head output, raw targets) to ``metrics``, skipping unlabelled
        entries."""
        prediction = self.decode(output.detach())
        if self.kind in DENSE_KINDS:  # the dense metrics skip unlabelled pixels themselves
            metrics.update(prediction, target)
            return
        if self.kind == "regression":
            mask = self.label_mask(target)
            if mask.dim() > 1:  # a row counts when all its outputs are labelled
                mask = mask.all(dim=-1)
            # always update (possibly with nothing): under DDP every process must take part in
            # the metric synchronisation, labelled rows or not
            metrics.update(prediction[mask], target[mask])
            return
        mask = self.label_mask(target)
        clean = torch.where(mask, target, torch.full_like(target, -1)).long()
        metrics.update(prediction, clean)


class BinaryLogLoss(Metric):
    """Mean binary cross-entropy ``-[y log p + (1 - y) log(1 - p)]`` over labelled samples, from
    probabilities ``p`` (clipped to ``[eps, 1 - eps]``) and 0/1 targets (``ignore_index`` or any
    negative value = unlabelled). Lower is better; the sums are added across processes.

    Example:
        >>> metric = BinaryLogLoss()
        >>> metric.update(torch.tensor([0.5, 0.9, 0.3]), torch.tensor([1, 1, -1]))
        >>> round(float(metric.compute()), 4)  # (ln 2 + ln(1/0.9)) / 2
        0.3993
    """

    higher_is_better = False
    is_differentiable = False
    full_state_update = False

    sum_loss: Tensor
    count: Tensor

    def __init__(self, *, ignore_index: int = -1, eps: float = 1e-7, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.ignore_index = ignore_index
        self.eps = eps
        self.add_state("sum_loss", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        p = preds.reshape(-1).double().clamp(self.eps, 1.0 - self.eps)
        y = target.reshape(-1)
        mask = (y >= 0) & (y != self.ignore_index)
        y = y.double()
        per = -(y * torch.log(p) + (1.0 - y) * torch.log1p(-p))
        self.sum_loss += torch.where(mask, per, torch.zeros_like(per)).sum()
        self.count += mask.sum()

    def compute(self) -> Tensor:
        if self.count == 0:  # nothing labelled: no value rather than a perfect 0
            return torch.tensor(math.nan, dtype=torch.float64, device=self.sum_loss.device)
        return self.sum_loss / self.count


def class_balanced_weights(
    counts: Sequence[float], *, method: str = "inverse", beta: float = 0.999
) -> tuple[float, ...]:
    """Per-class loss weights from training-label counts, normalised to average 1 over the
    classes: ``inverse`` frequency ``n / (C · n_c)``, or the ``effective`` number of samples of
    Cui, Jia, Lin, Song & Belongie, "Class-Balanced Loss Based on Effective Number of Samples",
    CVPR 2019: ``(1 − β) / (1 − β^n_c)``. Classes never seen get the largest weight.

    Example:
        >>> class_balanced_weights([30, 10])   # 40 / (2 · 30), 40 / (2 · 10), normalised
        (0.5, 1.5)
    """
    if method not in ("inverse", "effective"):
        raise ConfigError(f"class balance method {method!r}; valid: inverse, effective")
    raw = []
    for n in counts:
        if n <= 0:
            raw.append(math.inf)
        elif method == "inverse":
            raw.append(1.0 / n)
        else:
            raw.append((1.0 - beta) / (1.0 - beta**n))
    finite = [w for w in raw if math.isfinite(w)]
    top = max(finite) if finite else 1.0
    raw = [w if math.isfinite(w) else top for w in raw]
    mean = sum(raw) / len(raw)
    return tuple(round(w / mean, 6) for w in raw)


def _build_metric(kind: str, name: str, n: int) -> Metric:
    if kind in DENSE_KINDS:
        return build_dense_metric(kind, name, n)
    if kind == "regression":
        if name == "rmse":
            return regression.MeanSquaredError(squared=False, num_outputs=n)
        if name == "mae":
            return regression.MeanAbsoluteError(num_outputs=n)
        return regression.R2Score(multioutput="uniform_average")
    if kind == "binary":
        cls = {
            "accuracy": classification.BinaryAccuracy,
            "auroc": classification.BinaryAUROC,
            "f1": classification.BinaryF1Score,
            "precision": classification.BinaryPrecision,
            "recall": classification.BinaryRecall,
            "log_loss": BinaryLogLoss,
        }[name]
        return cls(ignore_index=-1)  # type: ignore[no-any-return]
    if kind == "multiclass":
        if name == "accuracy":
            return classification.MulticlassAccuracy(n, average="micro", ignore_index=-1)
        cls_mc = {
            "macro_f1": classification.MulticlassF1Score,
            "macro_precision": classification.MulticlassPrecision,
            "macro_recall": classification.MulticlassRecall,
        }[name]
        return cls_mc(n, average="macro", ignore_index=-1)  # type: ignore[no-any-return]
    if name == "accuracy":
        return classification.MultilabelAccuracy(n, average="micro", ignore_index=-1)
    if name == "auroc":
        return classification.MultilabelAUROC(n, average="macro", ignore_index=-1)
    cls_ml = {
        "macro_f1": classification.MultilabelF1Score,
        "macro_precision": classification.MultilabelPrecision,
        "macro_recall": classification.MultilabelRecall,
    }[name]
    return cls_ml(n, average="macro", ignore_index=-1)  # type: ignore[no-any-return]


def compute_metrics(metrics: MetricCollection) -> dict[str, float]:
    """Plain floats from a metric collection (NaN where a metric has seen no labelled data)."""
    out: dict[str, float] = {}
    for name, metric in metrics.items():
        if not metric.update_called:
            out[name] = math.nan
            continue
        try:
            value = metric.compute()
        except ValueError:  # e.g. R² of a single labelled sample
            out[name] = math.nan
            continue
        out[name] = float(value.float().mean())
    return out
