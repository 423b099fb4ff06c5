"""Cross-stitch networks, and ``encoder_stages``: an encoder split into the stages that layered
architectures (cross-stitch, MTAN) interleave with their own modules."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import cast

import torch
from torch import Tensor, nn

from polytask.errors import ConfigError
from polytask.models.architectures import (
    ARCHITECTURES,
    EncoderFactory,
    HeadFactory,
    MultiTaskModel,
    MultiTaskOutput,
)
from polytask.models.encoders import CNNEncoder, MLPEncoder, ResNetEncoder
from polytask.tasks import TaskSpec

__all__ = ["CrossStitch", "CrossStitchUnit", "Reshape", "encoder_stages"]

#: layers after which a stage ends (a following layer with parameters starts the next one)
_ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.GELU,
    nn.SiLU,
    nn.Tanh,
    nn.LeakyReLU,
    nn.ELU,
    nn.Sigmoid,
    nn.Mish,
)


class Reshape(nn.Module):
    """``[B, ...] -> [B, *shape]`` (what an image encoder does to its input first)."""

    def __init__(self, shape: Sequence[int]) -> None:
        super().__init__()
        self.shape = tuple(int(d) for d in shape)

    def forward(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], *self.shape)

    def extra_repr(self) -> str:
        return f"shape={self.shape}"


def _split_at_activations(layers: Iterable[nn.Module]) -> list[list[nn.Module]]:
    """Groups of consecutive layers, each ending after an activation (parameter-free layers that
    follow it, such as pooling or dropout, stay in its group)."""
    groups: list[list[nn.Module]] = [[]]
    activated = False
    for layer in layers:
        if activated and next(layer.parameters(), None) is not None:
            groups.append([])
            activated = False
        groups[-1].append(layer)
        activated = activated or isinstance(layer, _ACTIVATIONS)
    return [g for g in groups if g]


def encoder_stages(encoder: nn.Module, *, spatial: bool = False) -> list[nn.Module]:
    """``encoder`` split into consecutive stages whose composition is ``encoder.forward``.

    * ``MLPEncoder``: one stage per hidden layer (linear, [batch norm], activation, [dropout]);
      the first one flattens the input.
    * ``CNNEncoder``: one stage per convolution block (conv, batch norm, ReLU, [max-pool]), then
      the projection (flatten, dropout, linear, ReLU); the first one reshapes the input to the
      image.
    * ``ResNetEncoder``: the stem, then one stage per residual block; global pooling ends the
      last one.

    With ``spatial=True`` only the stages that output feature maps ``[B, C, H, W]`` are returned
    (image encoders only: the CNN's projection and the ResNet's pooling are left out). The stages
    hold the encoder's own modules (no copy). Any other encoder raises ``ConfigError``.

    Example:
        >>> enc = CNNEncoder((1, 8, 8), channels=(4, 6), out_features=5).eval()
        >>> stages = encoder_stages(enc)
        >>> len(stages), len(encoder_stages(enc, spatial=True))
        (3, 2)
        >>> x = torch.randn(2, 1, 8, 8)
        >>> torch.allclose(torch.nn.Sequential(*stages)(x), enc(x))
        True
    """
    if isinstance(encoder, MLPEncoder):
        if spatial:
            raise ConfigError(
                "needs an image encoder (cnn or resnet) whose stages output feature maps, "
                "found MLPEncoder"
            )
        groups = _split_at_activations(encoder.body)
        groups[0].insert(0, nn.Flatten())
        return [nn.Sequential(*g) for g in groups]
    if isinstance(encoder, CNNEncoder):
        groups = _split_at_activations(encoder.features)
        if not groups:
            if spatial:
                raise ConfigError("the cnn encoder has no convolution block (channels is empty)")
            return [nn.Sequential(Reshape(encoder._image), encoder.project)]
        groups[0].insert(0, Reshape(encoder._image))
        stages: list[nn.Module] = [nn.Sequential(*g) for g in groups]
        if not spatial:
            stages.append(encoder.project)
        return stages
    if isinstance(encoder, ResNetEncoder):
        stages = [nn.Sequential(Reshape(encoder._image), encoder.stem), *encoder.blocks]
        if not spatial:
            stages[-1] = nn.Sequential(stages[-1], encoder.pool, nn.Flatten())
        return stages
    stages_of = getattr(encoder, "stages", None)  # encoders that split themselves (tabular)
    if callable(stages_of) and not spatial:
        return list(stages_of())
    kinds = "cnn or resnet" if spatial else "mlp, cnn, resnet or tabular"
    raise ConfigError(
        f"cannot split a {type(encoder).__name__} encoder into stages; layered architectures "
        f"(cross_stitch, mtan) need a {kinds} encoder"
    )


class CrossStitchUnit(nn.Module):
    """A learnable ``K×K`` matrix mixing K task activations of the same shape: output ``j`` is
    ``sum_k weight[j, k] * input_k``. Initialised to ``self_weight`` on the diagonal and
    ``(1 - self_weight) / (K - 1)`` elsewhere (the identity when K = 1).

    Example:
        >>> unit = CrossStitchUnit(2, self_weight=0.9)
        >>> [round(t.item(), 4) for t in unit([torch.ones(1), torch.zeros(1)])]
        [0.9, 0.1]
    """

    def __init__(self, num_tasks: int, *, self_weight: float = 0.9) -> None:
        super().__init__()
        if num_tasks == 1:
            init = torch.ones(1, 1)
        else:
            init = torch.full((num_tasks, num_tasks), (1.0 - self_weight) / (num_tasks - 1))
            init.fill_diagonal_(self_weight)
        self.weight = nn.Parameter(init)

    def forward(self, columns: Sequence[Tensor]) -> list[Tensor]:
        stacked = torch.stack(list(columns))  # [K, B, ...]
        mixed = torch.tensordot(self.weight.to(stacked.dtype), stacked, dims=1)
        return list(mixed.unbind(0))


@ARCHITECTURES.register(
    "cross_stitch", "one network per task, mixed after every stage (Misra et al., CVPR 2016)"
)
class CrossStitch(MultiTaskModel):
    """Cross-stitch networks (Misra, Shrivastava, Gupta & Hebert, "Cross-stitch Networks for
    Multi-task Learning", CVPR 2016).

    Each task has its own column: a ``make_encoder()`` split into stages by ``encoder_stages``
    (mlp, cnn or resnet encoders). After every stage a cross-stitch unit (a learnable ``K×K``
    matrix, see ``CrossStitchUnit``) replaces each column's activation by a linear combination of
    all columns' activations; task ``k``'s head reads column ``k``. ``self_weight`` initialises
    the units (the paper's ``(α_S, α_D) = (0.9, 0.1)`` for two tasks). The paper also trains the
    units with a larger learning rate; give them their own optimizer parameter group to do so.

    * ``shared_parameters()``: the cross-stitch units only. The columns are task-specific (column
      ``k`` is task ``k``'s network), although the units let every task's loss reach them: they
      receive the plain gradient of the summed losses.
    * ``features``: ``None``. The columns feed the units and the units feed the columns, so no
      tensor separates the shared parameters from the task-specific ones; use gradient methods at
      ``level="parameters"``.

    Example:
        >>> from polytask.models.encoders import MLPEncoder
        >>> from polytask.models.heads import linear_head
        >>> tasks = [TaskSpec("a", "binary"), TaskSpec("b", "multiclass", num_classes=3)]
        >>> model = CrossStitch(tasks=tasks, make_encoder=lambda: MLPEncoder((6,), hidden=(8, 4)),
        ...                     make_head=lambda task, width: linear_head(width, task))
        >>> out = model(torch.randn(5, 6))
        >>> out.outputs["a"].shape, out.outputs["b"].shape, out.features, len(model.units)
        (torch.Size([5]), torch.Size([5, 3]), None, 2)
    """

    def __init__(
        self,
        *,
        tasks: Sequence[TaskSpec],
        make_encoder: EncoderFactory,
        make_head: HeadFactory,
        self_weight: float = 0.9,
    ) -> None:
        super().__init__()
        if not tasks:
            raise ConfigError("cross_stitch: needs at least one task")
        self.tasks = list(tasks)
        encoders = [make_encoder() for _ in self.tasks]
        width = getattr(encoders[0], "out_features", None)
        if not isinstance(width, int):
            raise ConfigError(
                f"cross_stitch: the encoder {type(encoders[0]).__name__} has no integer "
                "out_features"
            )
        try:
            columns = [encoder_stages(e) for e in encoders]
        except ConfigError as exc:
            raise ConfigError(f"cross_stitch: {exc}") from None
        self.columns = nn.ModuleDict(
            {t.name: nn.ModuleList(stages) for t, stages in zip(self.tasks, columns, strict=True)}
        )
        self.units = nn.ModuleList(
            CrossStitchUnit(len(self.tasks), self_weight=self_weight) for _ in columns[0]
        )
        self.heads = nn.ModuleDict({t.name: make_head(t, width) for t in self.tasks})

    def forward(self, x: Tensor) -> MultiTaskOutput:
        names = list(self.heads.keys())
        hidden = [x for _ in names]
        for i, unit in enumerate(self.units):
            hidden = unit([self._column(n)[i](h) for n, h in zip(names, hidden, strict=True)])
        outputs = {n: self.heads[n](h) for n, h in zip(names, hidden, strict=True)}
        return MultiTaskOutput(outputs, None)

    def _column(self, name: str) -> nn.ModuleList:
        return cast(nn.ModuleList, self.columns[name])

    def shared_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.units.parameters() if p.requires_grad]
