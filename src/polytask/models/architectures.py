"""How tasks share parameters. Every architecture is a ``MultiTaskModel``.

A ``MultiTaskModel`` maps an input batch to ``MultiTaskOutput(outputs={task: head output},
features=shared representation)`` and says which parameters are shared by every task (gradient
balancing methods need them) and which belong to one task.

Architectures are registered in ``ARCHITECTURES`` and built as
``ARCHITECTURES.get(name)(tasks=..., make_encoder=..., make_head=..., **params)``, where
``make_encoder()`` returns a fresh encoder (with ``out_features``) and ``make_head(task, width)``
a fresh head: an architecture composes them, it never inherits from them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

from torch import Tensor, nn

from polytask.registry import Registry
from polytask.tasks import TaskSpec

ARCHITECTURES: Registry = Registry("architecture", provided=("tasks", "make_encoder", "make_head"))

EncoderFactory = Callable[[], nn.Module]
HeadFactory = Callable[[TaskSpec, int], nn.Module]


class MultiTaskOutput(NamedTuple):
    """What a multi-task model returns: each task's raw head output, the shared features (the
    representation every task reads, for representation-level balancing) and optional extras
    (e.g. ``gates``: per-task gate weights of expert models, ``[B, experts]`` each)."""

    outputs: dict[str, Tensor]
    features: Tensor | None
    extras: dict[str, Any] | None = None


class MultiTaskModel(nn.Module):
    """Base class: ``forward(x) -> MultiTaskOutput``; shared and task-specific parameters."""

    tasks: list[TaskSpec]

    def forward(self, x: Tensor) -> MultiTaskOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def shared_parameters(self) -> list[nn.Parameter]:
        """Parameters every task's loss depends on (what gradient methods balance)."""
        raise NotImplementedError

    def task_parameters(self) -> Iterator[nn.Parameter]:
        """Every parameter that is not shared."""
        shared = {id(p) for p in self.shared_parameters()}
        return (p for p in self.parameters() if id(p) not in shared)


@ARCHITECTURES.register("hard_sharing", "one shared encoder, one head per task (Caruana 1997)")
class HardSharing(MultiTaskModel):
    """Hard parameter sharing (Caruana, Machine Learning 1997): a shared encoder and one head per
    task.

    Example:
        >>> from polytask.models.encoders import MLPEncoder
        >>> from polytask.models.heads import linear_head
        >>> tasks = [TaskSpec("a", "regression"), TaskSpec("b", "multiclass", num_classes=3)]
        >>> model = HardSharing(tasks=tasks, make_encoder=lambda: MLPEncoder((4,), hidden=(8,)),
        ...                     make_head=lambda task, width: linear_head(width, task))
        >>> out = model(__import__("torch").zeros(5, 4))
        >>> out.outputs["a"].shape, out.outputs["b"].shape, out.features.shape
        (torch.Size([5]), torch.Size([5, 3]), torch.Size([5, 8]))
    """

    def __init__(
        self, *, tasks: Sequence[TaskSpec], make_encoder: EncoderFactory, make_head: HeadFactory
    ) -> None:
        super().__init__()
        self.tasks = list(tasks)
        self.encoder = make_encoder()
        width = int(self.encoder.out_features)  # type: ignore[arg-type]
        self.heads = nn.ModuleDict({t.name: make_head(t, width) for t in self.tasks})

    def forward(self, x: Tensor) -> MultiTaskOutput:
        features = self.encoder(x)
        return MultiTaskOutput(
            {name: head(features) for name, head in self.heads.items()}, features
        )

    def shared_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.encoder.parameters() if p.requires_grad]
