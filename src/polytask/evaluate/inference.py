"""The one inference loop: a model's outputs batch by batch, without gradients, in evaluation
mode. ``evaluate`` (metrics of a split), ``ranking_report`` (AUC/GAUC of a split) and
``polytask.serve.predict`` (predictions for new inputs) all read their outputs from
``inference``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import Tensor

from polytask.data.batches import Batch, BatchLoader, MultiLabelDataset
from polytask.data.preprocess import Inputs, inputs_to
from polytask.models import MultiTaskModel
from polytask.tasks import TaskSpec

__all__ = ["decoded_predictions", "inference"]


@torch.no_grad()
def inference(
    model: MultiTaskModel, batches: Iterable[Batch], *, device: torch.device | str = "cpu"
) -> Iterator[tuple[dict[str, Tensor], dict[str, Tensor]]]:
    """Per batch, the raw head outputs ``{task: output}`` with the batch's labels, computed in
    evaluation mode (no dropout, batch-norm running statistics) without gradients; the inputs
    are moved to ``device`` (the model is not) and the model's training mode is restored when
    the loop ends.

    Example:
        >>> from polytask.models import build_model
        >>> tasks = [TaskSpec("y", "regression")]
        >>> model = build_model(tasks, (3,), encoder_params={"hidden": [4]})
        >>> loader = BatchLoader(MultiLabelDataset(torch.randn(10, 3), {}), 4)
        >>> [tuple(out["y"].shape) for out, _ in inference(model, loader)], model.training
        ([(4,), (4,), (2,)], True)
    """
    was_training = model.training
    model.eval()
    try:
        for inputs, labels in batches:
            yield model(inputs_to(inputs, device)).outputs, labels
    finally:
        model.train(was_training)


def decoded_predictions(
    model: MultiTaskModel,
    inputs: Inputs,
    tasks: Sequence[TaskSpec],
    *,
    batch_size: int = 1024,
    device: torch.device | str = "cpu",
) -> dict[str, Tensor]:
    """Each task's decoded predictions (``TaskSpec.decode``: class probabilities, probabilities
    of 1, values in original units) for every row of ``inputs``, in order, on the CPU; the model
    is moved to ``device`` and fed ``batch_size`` rows at a time."""
    model.to(device)
    rows = BatchLoader(MultiLabelDataset(inputs, {}), batch_size)
    chunks: dict[str, list[Tensor]] = {t.name: [] for t in tasks}
    for outputs, _ in inference(model, rows, device=device):
        for task in tasks:
            chunks[task.name].append(task.decode(outputs[task.name]).cpu())
    return {name: torch.cat(parts) if parts else torch.zeros(0) for name, parts in chunks.items()}
