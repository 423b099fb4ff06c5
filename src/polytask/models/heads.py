"""Task heads: map shared features ``[B, F]`` to one task's output.

Binary tasks and single-output regression return ``[B]``; the others ``[B, output_dim]``.
Heads are registered in ``HEADS`` and built as ``HEADS.get(name)(in_features, task, **params)``.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from polytask.models.encoders import mlp_layers
from polytask.registry import Registry
from polytask.tasks import TaskSpec

HEADS: Registry = Registry("head", provided=("in_features", "task"))


class TaskHead(nn.Module):
    """Optional hidden layers, then a linear layer of ``task.output_dim`` units."""

    def __init__(
        self,
        in_features: int,
        task: TaskSpec,
        *,
        hidden: Sequence[int] = (),
        dropout: float = 0.0,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        self.body = mlp_layers(in_features, hidden, dropout=dropout, activation_name=activation)
        width = hidden[-1] if hidden else in_features
        self.out = nn.Linear(width, task.output_dim)
        self.squeeze = task.output_dim == 1 and task.kind in ("binary", "regression")

    def forward(self, features: Tensor) -> Tensor:
        y = self.out(self.body(features))
        return y.squeeze(-1) if self.squeeze else y


@HEADS.register("linear", "one linear layer per task")
def linear_head(in_features: int, task: TaskSpec) -> TaskHead:
    """One linear layer per task."""
    return TaskHead(in_features, task)


@HEADS.register("mlp", "hidden layers then a linear layer, per task")
def mlp_head(
    in_features: int,
    task: TaskSpec,
    *,
    hidden: Sequence[int] = (64,),
    dropout: float = 0.0,
    activation: str = "relu",
) -> TaskHead:
    """Hidden layers (``hidden`` widths) then a linear layer, per task."""
    return TaskHead(in_features, task, hidden=hidden, dropout=dropout, activation=activation)
