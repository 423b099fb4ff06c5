"""GradDrop: per coordinate, keep only the positive or only the negative task gradients."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from polytask.balancing.base import BALANCERS
from polytask.balancing.engine import GradientAggregator, Level
from polytask.errors import ConfigError
from polytask.tasks import TaskSpec


def seeded_generator(seed: int, counter: int, device: torch.device | str) -> torch.Generator:
    """A generator on ``device`` for the ``counter``-th draw of a run seeded ``seed``: the pair
    is mixed by NumPy's ``SeedSequence`` so consecutive counters give independent streams, and a
    counter kept in a buffer makes the randomness checkpointable. (CPU and CUDA generators give
    different streams for the same pair.)"""
    state = np.random.SeedSequence([seed, counter]).generate_state(2, dtype=np.uint32)
    mixed = (int(state[0]) << 31) ^ int(state[1])
    generator = torch.Generator(device=device)
    generator.manual_seed(mixed)
    return generator


def sign_purity(jacobian: Tensor) -> Tensor:
    """The positive sign purity ``P = ½ (1 + Σ_i g_i / Σ_i |g_i|)`` of every coordinate (``[P]``):
    1 when every task's component is ≥ 0, 0 when every one is ≤ 0, ½ where all are zero.

    Example:
        >>> sign_purity(torch.tensor([[3.0, 1.0, -2.0, 0.0], [-1.0, 2.0, -1.0, 0.0]])).tolist()
        [0.75, 1.0, 0.0, 0.5]
    """
    total = jacobian.sum(dim=0)
    mass = jacobian.abs().sum(dim=0)
    ratio = torch.where(mass > 0, total / torch.where(mass > 0, mass, 1.0), 0.0)
    return 0.5 * (1.0 + ratio)


def graddrop_update(jacobian: Tensor, uniform: Tensor, leak: float = 0.0) -> Tensor:
    """The GradDrop update for uniform draws ``uniform`` (``[P]`` in [0, 1)).

    Coordinate ``p`` keeps the positive task components where ``U_p < P_p`` and the negative
    ones otherwise, so it is exactly ``Σ_i max(g_ip, 0)`` or ``Σ_i min(g_ip, 0)``; ``leak``
    blends with the plain sum: ``leak · Σ_i g_i + (1 − leak) · kept``.

    Example:
        >>> j = torch.tensor([[3.0, 1.0], [-1.0, 2.0]])  # purities 0.75 and 1
        >>> graddrop_update(j, torch.tensor([0.5, 0.99])).tolist()  # keep + in both
        [3.0, 3.0]
        >>> graddrop_update(j, torch.tensor([0.8, 0.99])).tolist()  # keep − in the first
        [-1.0, 3.0]
    """
    keep_positive = uniform < sign_purity(jacobian).to(uniform.dtype)
    positive = jacobian.clamp(min=0).sum(dim=0)
    negative = jacobian.clamp(max=0).sum(dim=0)
    kept = torch.where(keep_positive, positive, negative)
    if leak == 0.0:
        return kept
    return leak * jacobian.sum(dim=0) + (1.0 - leak) * kept


@BALANCERS.register(
    "graddrop",
    "gradient sign dropout: per coordinate keep one sign, chosen by sign purity (Chen, Ngiam, "
    "Huang, Luong, Kretzschmar, Chai & Anguelov, NeurIPS 2020)",
)
class GradDrop(GradientAggregator):
    """Gradient Sign Dropout (Chen, Ngiam, Huang, Luong, Kretzschmar, Chai & Anguelov, "Just Pick
    a Sign: Optimizing Deep Multitask Models with Gradient Sign Dropout", NeurIPS 2020).

    For every coordinate ``p`` of the Jacobian, the positive sign purity

        ``P_p = ½ (1 + Σ_i g_ip / Σ_i |g_ip|)``

    is the probability of keeping the positive components: with ``U_p ~ Uniform[0, 1)``, the
    task components ``g_ip > 0`` are kept if ``U_p < P_p`` (``f(P) = P``, the paper's choice)
    and the components ``g_ip < 0`` otherwise; the update is the sum of the kept components,
    ``leak · Σ_i g_ip + (1 − leak) · kept_p`` with ``leak`` in [0, 1] (0: pure GradDrop, as the
    paper's default; 1: the plain sum). Where all tasks agree in sign, the coordinate is exactly
    their sum. It is not a weighting of the task gradients: the reported weights are ones.

    The paper applies it at the activations below the task heads, to the batch-summed
    gradients corrected by the sign of the input (LibMTL also works at that level); this
    implementation applies it element-wise to whatever Jacobian it is given: per feature element
    of each sample (``level="features"``, the default: the representation level, the paper's own
    choice, without that batch sum; the encoder then gets one ordinary backward of the dropped
    feature gradient, so a step costs about 1.1–1.3× an equal-weighting step) or per shared
    parameter (``level="parameters"``: the K×P Jacobian, 10–17× at K = 10; an architecture that
    returns no shared representation, such as ``cross_stitch``, needs it).

    Randomness: the draws of step ``n`` come from a generator on the Jacobian's device seeded by
    ``(seed, n)``; the counter ``n`` is a buffer (``draws``), so ``load_state_dict`` resumes the
    same stream (reading it is one host synchronisation per step). CPU and CUDA streams differ.

    Numerical guarantee (``leak=0``): every coordinate is exactly ``Σ_i max(g_ip, 0)`` or ``Σ_i
    min(g_ip, 0)``, the one the seeded draw and the purity pick (draws within 1e-5 of the purity
    aside), to ``K·eps·Σ_i |g_ip|``, on gradient norms from 1e-4 to 1e4 in one matrix, zero,
    duplicated and near-opposite gradients, K from 2 to 10, P up to 1000, float32 and float64
    (``tests/balancing/aggregation/test_numerical_guarantees.py``).

    Args:
        tasks: the tasks, in the order of the losses.
        leak: fraction of the plain sum blended in, in [0, 1].
        seed: seed of the sign draws.
        level: ``features`` (default) or ``parameters`` (see ``GradientAggregator``).
        update_every: must be 1 (the update is not a fixed weighting of the gradients).

    Example:
        >>> agg = GradDrop(["a", "b"])
        >>> jacobian = torch.tensor([[1.0, -2.0, 3.0], [2.0, -1.0, -3.0]])
        >>> update, weights = agg.aggregate(jacobian, torch.ones(2))
        >>> update[:2].tolist(), weights.tolist()  # signs agree: the plain sum
        ([3.0, -3.0], [1.0, 1.0])
        >>> update[2].item() in (3.0, -3.0)  # purity ½: +3 or −3, never the sum 0
        True
    """

    draws: Tensor

    def __init__(
        self,
        tasks: Sequence[TaskSpec | str],
        *,
        leak: float = 0.0,
        seed: int = 0,
        level: Level = "features",
        update_every: int = 1,
    ) -> None:
        super().__init__(tasks, level=level, update_every=update_every)
        if not 0.0 <= leak <= 1.0:
            raise ConfigError(f"leak must be in [0, 1], found {leak}")
        if seed < 0:
            raise ConfigError(f"seed must be >= 0, found {seed}")
        self.leak = float(leak)
        self.seed = int(seed)
        self.register_buffer("draws", torch.zeros((), dtype=torch.long))

    def aggregate(
        self, jacobian: Tensor, losses: Tensor, rows: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        generator = seeded_generator(self.seed, int(self.draws), jacobian.device)
        self.draws += 1
        dtype = torch.promote_types(jacobian.dtype, torch.float32)
        uniform = torch.rand(jacobian.shape[1], generator=generator, device=jacobian.device)
        uniform = uniform.to(dtype)
        update = graddrop_update(jacobian, uniform, self.leak)
        return update, torch.ones(jacobian.shape[0], device=jacobian.device, dtype=jacobian.dtype)
