"""Knowledge distillation (Hinton, Vinyals & Dean, 2015): a smaller multi-task student trained
on a teacher run's outputs and the ground truth, every task at once, by the usual run machinery
(``train_run``, any balancing method) into a new run folder.

Each task's loss is ``alpha · ground-truth loss + (1 - alpha) · distillation loss``:

* multiclass: ``T² · KL(softmax(teacher / T) ‖ softmax(student / T))``;
* binary, multilabel: ``T² · BCE(sigmoid(student / T), sigmoid(teacher / T))``, minus its
  minimum (the teacher's entropy), so a perfect student has loss 0;
* regression: the squared error to the teacher's values (both standardised, as the heads
  predict them).

The teacher sees the same training batches (inputs only: rows without labels count too), in
evaluation mode and without gradients.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from polytask.config import RunConfig, load_config
from polytask.data.preprocess import inputs_to
from polytask.errors import ConfigError
from polytask.models import MultiTaskModel
from polytask.models.tabular import auto_embedding_dim
from polytask.run.folder import RunFolder
from polytask.run.single import RunResult, train_run
from polytask.tasks import TaskSpec
from polytask.train.trainer import Trainer

#: named student sizes: the factor on every width of the teacher's encoder and heads
STUDENT_SIZES = {"half": 0.5, "quarter": 0.25, "small": 0.5, "tiny": 0.25}
#: the encoder/head parameters that are widths (an int, or a list of ints)
WIDTH_KEYS = (
    "hidden", "channels", "out_features", "d_model", "feedforward", "embedding_dim",
    "expert_hidden", "tower_hidden",
)  # fmt: skip


def distillation_loss(
    task: TaskSpec, student: Tensor, teacher: Tensor, temperature: float
) -> Tensor:
    """The mean distillation loss of one task's raw head outputs (see the module docstring)."""
    t = temperature
    if task.kind == "multiclass":
        log_student = F.log_softmax(student / t, dim=-1)
        log_teacher = F.log_softmax(teacher / t, dim=-1)
        kl = F.kl_div(log_student, log_teacher, log_target=True, reduction="batchmean")
        return kl * t * t
    if task.kind in ("binary", "multilabel"):
        soft = torch.sigmoid(teacher / t)
        cross = F.binary_cross_entropy_with_logits(student / t, soft, reduction="none")
        entropy = F.binary_cross_entropy_with_logits(teacher / t, soft, reduction="none")
        return (cross - entropy).mean() * t * t
    return F.mse_loss(student, teacher)


class DistillationTrainer(Trainer):
    """A ``Trainer`` whose task losses mix the ground truth with a frozen ``teacher``'s outputs
    (``alpha`` on the ground truth, ``temperature`` for classification)."""

    def __init__(
        self,
        *args: Any,
        teacher: MultiTaskModel,
        temperature: float = 2.0,
        alpha: float = 0.5,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if temperature <= 0 or not 0.0 <= alpha <= 1.0:
            raise ConfigError(
                f"distill: temperature > 0 and alpha in [0, 1], found {temperature}, {alpha}"
            )
        self.teacher = teacher.to(self.device).eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.temperature, self.alpha = float(temperature), float(alpha)

    def _task_losses(self, x: Any, y: Mapping[str, Tensor]) -> tuple[Any, Tensor, Tensor]:
        out, losses, counts = super()._task_losses(x, y)
        with torch.no_grad():
            taught = self.teacher(inputs_to(x, self.device)).outputs
        soft = torch.stack(
            [
                distillation_loss(
                    t, out.outputs[t.name].float(), taught[t.name].float(), self.temperature
                )
                for t in self.tasks
            ]
        )
        return out, self.alpha * losses + (1.0 - self.alpha) * soft, counts


def scaled_widths(params: Mapping[str, Any], factor: float) -> dict[str, Any]:
    """``params`` with every width (``WIDTH_KEYS``) times ``factor`` (at least 1; ``d_model`` a
    multiple of ``heads``), nested encoder parameters included.

    >>> scaled_widths({"hidden": [64, 32], "dropout": 0.1}, 0.5)
    {'hidden': [32, 16], 'dropout': 0.1}
    """
    out: dict[str, Any] = {}
    heads = int(params.get("heads", 1) or 1)
    for key, value in params.items():
        if isinstance(value, Mapping):
            out[key] = scaled_widths(value, factor)
        elif key in WIDTH_KEYS and isinstance(value, int) and not isinstance(value, bool):
            step = heads if key == "d_model" else 1
            out[key] = max(step, round(value * factor / step) * step)
        elif key in WIDTH_KEYS and isinstance(value, list):
            out[key] = [max(1, round(v * factor)) for v in value]
        else:
            out[key] = value
    return out


def student_config(
    teacher: RunConfig, student: str, *, input_shape: Any = None, source: str = "student"
) -> RunConfig:
    """The student's configuration: the teacher's, with its model either scaled down
    (``student`` a size: ``half``, ``quarter``, or a factor such as ``0.3``) or replaced by the
    ``model`` section of the YAML file ``student``. Scaled down, a ``tabular`` encoder's
    automatic embedding widths shrink too (per column of ``input_shape``'s categorical block,
    the teacher's, when given)."""
    factor = STUDENT_SIZES.get(student)
    if factor is None:
        try:
            factor = float(student)
        except ValueError:
            factor = None
    if factor is not None:
        if not 0 < factor <= 1:
            raise ConfigError(f"{source}: a size factor in (0, 1], found {student}")
        encoder_params = scaled_widths(teacher.model.encoder_params, factor)
        encoder_params.update(_embedding_widths(teacher, input_shape, factor))
        model = teacher.model.model_copy(
            update={
                "encoder_params": encoder_params,
                "head_params": scaled_widths(teacher.model.head_params, factor),
            }
        )
        return teacher.model_copy(update={"model": model})
    path = Path(student)
    if not path.is_file():
        raise ConfigError(
            f"{source}: {student!r} is neither a size ({', '.join(STUDENT_SIZES)}, or a factor "
            "such as 0.3) nor a YAML file"
        )
    return teacher.model_copy(update={"model": load_config(path).model})


def _embedding_widths(teacher: RunConfig, input_shape: Any, factor: float) -> dict[str, Any]:
    """``embedding_dims`` for a scaled ``tabular`` encoder whose widths are automatic."""
    params = teacher.model.encoder_params
    block = input_shape.get("categorical") if isinstance(input_shape, dict) else None
    automatic = params.get("embedding_dim", "auto") == "auto" and not params.get("embedding_dims")
    if teacher.model.encoder != "tabular" or not automatic or not block:
        return {}
    widths = (auto_embedding_dim(int(n)) for n in block["cardinalities"])
    return {
        "embedding_dims": {
            column: max(1, round(width * factor))
            for column, width in zip(block["columns"], widths, strict=True)
        }
    }


def distill_run(
    run_dir: str | Path,
    student: str,
    *,
    temperature: float = 2.0,
    alpha: float = 0.5,
    epochs: int | None = None,
    method: str | None = None,
    checkpoint: str = "best",
    progress: bool | None = None,
) -> RunResult:
    """Train a student of the run in ``run_dir`` (``student``: see ``student_config``) on the
    teacher's data, its loss per task mixing the ground truth (``alpha``) with the teacher's
    outputs (``temperature``); ``method`` overrides the balancing method and ``epochs`` the
    teacher's. The student is a new run folder beside the teacher's, ``<name>-student``."""
    folder = RunFolder(run_dir)
    trained = folder.load_trained(checkpoint)
    config = student_config(trained.config, student, input_shape=trained.input_shape)
    update: dict[str, Any] = {
        "name": f"{trained.config.name}-student",
        "output_dir": str(folder.path.parent),
    }
    if epochs is not None:
        update["train"] = config.train.model_copy(update={"epochs": epochs})
    if method is not None:
        update["balancing"] = config.balancing.model_copy(update={"method": method})
    config = config.model_copy(update=update)

    def distilling(*args: Any, **kwargs: Any) -> Trainer:
        return DistillationTrainer(
            *args, teacher=trained.model, temperature=temperature, alpha=alpha, **kwargs
        )

    return train_run(config, make_trainer=distilling, progress=progress)


def parameter_count(model: torch.nn.Module) -> int:
    """The number of parameters of ``model``."""
    return sum(p.numel() for p in model.parameters())


__all__: Sequence[str] = [
    "STUDENT_SIZES",
    "DistillationTrainer",
    "distill_run",
    "distillation_loss",
    "parameter_count",
    "scaled_widths",
    "student_config",
]
