"""GradVac: raise each pair of task gradients to an adaptive target cosine similarity."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from polytask.balancing.base import BALANCERS
from polytask.balancing.engine import GradientAggregator, Level, present_rows
from polytask.balancing.jacobian import gramian
from polytask.errors import ConfigError
from polytask.tasks import TaskSpec

#: targets are kept inside (-1 + δ, 1 - δ) in the correction, whose denominator is √(1 - φ̂²)
TARGET_MARGIN = 1e-6


def gradvac_coefficients(
    gram: np.ndarray,
    targets: np.ndarray,
    beta: float,
    orders: Sequence[Sequence[int]],
) -> tuple[np.ndarray, np.ndarray]:
    """The GradVac correction on the Gramian: ``(C, new_targets)``.

    Row ``i`` of ``C`` gives the corrected gradient ``g_i' = Σ_k C_ik g_k``. For task ``i``, the
    other tasks ``j`` are visited in ``orders[i]`` (``i`` itself is skipped); with
    ``φ = cos(g_i', g_j)`` (the current, already corrected ``g_i'``, the original ``g_j``) and
    the target ``φ̂ = targets[i, j]``, when ``φ < φ̂``

        ``g_i' ← g_i' + g_j · ‖g_i'‖ (φ̂ √(1−φ²) − φ √(1−φ̂²)) / (‖g_j‖ √(1−φ̂²))``

    which makes ``cos(g_i', g_j) = φ̂`` exactly; then, whatever the comparison,
    ``new_targets[i, j] = (1 − beta) φ̂ + beta φ``. Every quantity comes from ``gram = J Jᵀ``
    (float64): ``g_i'·g_j = (C_i G)_j`` and ``‖g_i'‖² = C_i G C_iᵀ``, updated in O(K) per pair.
    Zero gradients give ``φ = 0`` and no correction.

    Example (orthogonal unit gradients, target cosine 1/2 for both pairs):
        >>> c, t = gradvac_coefficients(np.eye(2), np.full((2, 2), 0.5), 0.01, [[1], [0]])
        >>> np.round(c, 4).tolist(), np.round(t, 4).tolist()  # 1/√3 ≈ 0.5774; 0.99·0.5 = 0.495
        ([[1.0, 0.5774], [0.5774, 1.0]], [[0.5, 0.495], [0.495, 0.5]])
    """
    k = gram.shape[0]
    coeffs = np.eye(k)
    new_targets = np.array(targets, dtype=np.float64, copy=True)
    sq_norms = np.clip(np.diag(gram), 0.0, None)
    for i in range(k):
        cg = np.array(gram[i], dtype=np.float64, copy=True)  # (C_i G): g_i'·g_k for every k
        sq = float(sq_norms[i])  # ‖g_i'‖²
        for j in orders[i]:
            if j == i:
                continue
            norm_i = math.sqrt(max(sq, 0.0))
            norm_j = math.sqrt(float(sq_norms[j]))
            denom = norm_i * norm_j
            phi = min(max(float(cg[j]) / denom, -1.0), 1.0) if denom > 0.0 else 0.0
            target = float(targets[i, j])
            if phi < target and denom > 0.0:
                t = min(max(target, -1.0 + TARGET_MARGIN), 1.0 - TARGET_MARGIN)
                root_t = math.sqrt(1.0 - t * t)
                w = norm_i * (t * math.sqrt(1.0 - phi * phi) - phi * root_t) / (norm_j * root_t)
                coeffs[i, j] += w
                sq += 2.0 * w * float(cg[j]) + w * w * float(gram[j, j])
                cg += w * gram[j]
            new_targets[i, j] = (1.0 - beta) * target + beta * phi
    return coeffs, new_targets


@BALANCERS.register(
    "gradvac",
    "gradient vaccine: raise pairwise gradient cosines to EMA targets (Wang, Tsvetkov, Firat & "
    "Cao, ICLR 2021)",
)
class GradVac(GradientAggregator):
    """Gradient Vaccine (Wang, Tsvetkov, Firat & Cao, "Gradient Vaccine: Investigating and
    Improving Multi-task Optimization in Massively Multilingual Models", ICLR 2021).

    Each ordered pair of tasks ``(i, j)`` has a target cosine ``φ̂_ij``, an exponential moving
    average of the cosines seen so far (``φ̂ ← (1 − beta) φ̂ + beta φ``, starting at 0). For each
    task ``i`` and the other tasks ``j`` in random order, if ``φ = cos(g_i', g_j) < φ̂_ij``,

        ``g_i' ← g_i' + g_j · ‖g_i'‖ (φ̂ √(1−φ²) − φ √(1−φ̂²)) / (‖g_j‖ √(1−φ̂²))``,

    which sets their cosine to ``φ̂_ij`` exactly (PCGrad is the special case ``φ̂ = 0`` applied
    only to negative cosines). The update is ``Σ_i g_i'`` (the sum, as the authors' and LibMTL's
    code). Every ``g_i'`` is a combination of the original gradients, so the method runs on the
    Gramian and tracks the coefficients ``C`` (``g_i' = C_i J``); the reported weights are
    ``1ᵀ C`` and the update is exactly ``weights @ J``.

    Being a weighting of the Gramian, it takes the layer-wise Gramian where the model allows it
    (``layerwise.py``): same weights, targets and update as on the Jacobian path.

    The paper can apply this per layer; here it is applied to the whole shared-parameter vector
    (LibMTL's ``group_type=0``). The K×K Gramian is moved to the CPU for the sequential pairwise
    loop (one host synchronisation per step). The random order comes from ``seed`` and a draw
    counter kept in a buffer, so the targets (``targets``, K×K) and the order are both restored
    by ``load_state_dict``. Tasks absent from a step keep their targets.

    Numerical guarantee: the update equals the paper's sequential correction run in float64 on
    the rows with the same orders (every corrected pair then has cosine ``φ̂`` exactly), to
    ``50·K²·eps·Σ_i (||g_i|| + ||g_i'||)``, on gradient norms from 1e-4 to 1e4 in one matrix,
    zero, duplicated and near-opposite gradients, K from 2 to 10, P up to 1000, float32 and
    float64 (``tests/balancing/aggregation/test_numerical_guarantees.py``).

    Args:
        tasks: the tasks, in the order of the losses.
        beta: EMA rate of the target cosines (the paper uses 0.01; LibMTL defaults to 0.5).
        seed: seed of the random task order.
        level: ``parameters`` or ``features`` (see ``GradientAggregator``).
        update_every: must be 1 (the update is not a fixed weighting of the gradients).

    Example:
        >>> agg = GradVac(["a", "b"])
        >>> _ = agg.targets.fill_(0.5)  # pretend the EMA has reached cosine 1/2
        >>> update, weights = agg.aggregate(torch.eye(2), torch.ones(2))
        >>> [round(w, 4) for w in weights.tolist()]  # 1 + 1/√3 each
        [1.5774, 1.5774]
    """

    targets: Tensor
    draws: Tensor

    def __init__(
        self,
        tasks: Sequence[TaskSpec | str],
        *,
        beta: float = 0.01,
        seed: int = 0,
        level: Level = "parameters",
        update_every: int = 1,
    ) -> None:
        super().__init__(tasks, level=level, update_every=update_every)
        if not 0.0 <= beta <= 1.0:
            raise ConfigError(f"beta must be in [0, 1], found {beta}")
        if seed < 0:
            raise ConfigError(f"seed must be >= 0, found {seed}")
        self.beta = float(beta)
        self.seed = int(seed)
        k = self.num_tasks
        self.register_buffer("targets", torch.zeros(k, k, dtype=torch.float64))
        self.register_buffer("draws", torch.zeros((), dtype=torch.long))

    def weights_from_gramian(
        self, gramian: Tensor, losses: Tensor, rows: Tensor | None = None
    ) -> Tensor:
        """The weights ``1ᵀC`` from the Gramian of the present tasks ``rows``; updates their
        targets and the draw counter."""
        k = gramian.shape[0]
        index = present_rows(k, self.num_tasks, rows, "GradVac").to("cpu")
        gram = gramian.detach().to("cpu", torch.float64).numpy()
        rng = np.random.default_rng([self.seed, int(self.draws)])
        orders = [rng.permutation(k).tolist() for _ in range(k)]
        sub = self.targets.detach().to("cpu")[index][:, index].numpy()
        coeffs, new_sub = gradvac_coefficients(gram, sub, self.beta, orders)
        targets = self.targets.detach().to("cpu").clone()
        targets[index.unsqueeze(1), index.unsqueeze(0)] = torch.from_numpy(new_sub)
        self.targets.copy_(targets)
        self.draws += 1
        return torch.from_numpy(coeffs.sum(axis=0)).to(gramian.device)

    def aggregate(
        self, jacobian: Tensor, losses: Tensor, rows: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """(update, weights) for the Jacobian of the tasks ``rows`` (all tasks by default)."""
        weights = self.weights_from_gramian(gramian(jacobian), losses, rows)
        weights = weights.to(jacobian.device, jacobian.dtype)
        return weights @ jacobian, weights

    def _is_gramian_weighting(self) -> bool:
        # a weighting of the Gramian (with EMA targets): takes the layer-wise path
        return True
