"""Batch prediction: a table of inputs in, one column per task out."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from polytask.data.preprocess import Inputs, inputs_to, num_rows, take_inputs
from polytask.models import MultiTaskModel
from polytask.tasks import TaskSpec


@torch.no_grad()
def predict_arrays(
    model: MultiTaskModel,
    tasks: Sequence[TaskSpec],
    inputs: Inputs,
    *,
    batch_size: int = 1024,
    device: torch.device | str = "cpu",
) -> dict[str, np.ndarray]:
    """Predictions per output column: the class (multiclass), the probability of 1 (binary),
    one probability column per label (multilabel, ``task_i``), the value in original units
    (regression; ``task_i`` per output when there are several)."""
    model.eval().to(device)
    decoded: dict[str, list[Tensor]] = {t.name: [] for t in tasks}
    n = num_rows(inputs)
    for start in range(0, n, batch_size):
        x = inputs_to(take_inputs(inputs, torch.arange(start, min(start + batch_size, n))), device)
        outputs = model(x).outputs
        for task in tasks:
            decoded[task.name].append(task.decode(outputs[task.name]).cpu())
    columns: dict[str, np.ndarray] = {}
    for task in tasks:
        values = torch.cat(decoded[task.name]).numpy()
        if task.kind == "multiclass":
            columns[task.name] = values.argmax(axis=-1)
        elif values.ndim == 1:
            columns[task.name] = values
        else:
            for i in range(values.shape[1]):
                columns[f"{task.name}_{i}"] = values[:, i]
    return columns
