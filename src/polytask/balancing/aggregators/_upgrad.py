"""UPGrad: average of the task gradients, each projected onto the dual cone of all of them."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from polytask.balancing.aggregators._solvers import project_onto_dual_cone
from polytask.balancing.base import BALANCERS
from polytask.balancing.gradient import GramianWeightingAggregator, Level
from polytask.errors import ConfigError
from polytask.tasks import TaskSpec


def regularized_normalized_gramian(gramian: Tensor, *, norm_eps: float, reg_eps: float) -> Tensor:
    """As torchjd: ``G / tr(G)`` (zeros when ``tr(G) < norm_eps``), plus ``reg_eps · I``.

    Example:
        >>> regularized_normalized_gramian(torch.tensor([[3.0, 1.0], [1.0, 1.0]]),
        ...                                norm_eps=1e-4, reg_eps=0.25)
        tensor([[1.0000, 0.2500],
                [0.2500, 0.5000]])
    """
    trace = gramian.diagonal().sum()
    safe = torch.where(trace >= norm_eps, trace, torch.ones_like(trace))
    normalized = torch.where(trace >= norm_eps, gramian / safe, torch.zeros_like(gramian))
    eye = torch.eye(gramian.shape[0], dtype=gramian.dtype, device=gramian.device)
    return normalized + reg_eps * eye


class _PreferenceMixin(GramianWeightingAggregator):
    """Holds a preference vector over all tasks and selects the present tasks' entries."""

    pref_vector: Tensor

    def __init__(
        self,
        tasks: Sequence[TaskSpec | str],
        *,
        pref_vector: Sequence[float] | None = None,
        norm_eps: float = 1e-4,
        reg_eps: float = 1e-4,
        level: Level = "parameters",
        update_every: int = 1,
    ) -> None:
        super().__init__(tasks, level=level, update_every=update_every)
        if not norm_eps >= 0.0:
            raise ConfigError(f"norm_eps must be >= 0, found {norm_eps}")
        if not reg_eps >= 0.0:
            raise ConfigError(f"reg_eps must be >= 0, found {reg_eps}")
        self.norm_eps = float(norm_eps)
        self.reg_eps = float(reg_eps)
        self._init_preference(pref_vector)

    def _init_preference(self, pref_vector: Sequence[float] | None) -> None:
        self._uniform = pref_vector is None
        if pref_vector is None:
            pref = torch.full((self.num_tasks,), 1.0 / max(self.num_tasks, 1))
        else:
            pref = torch.as_tensor([float(p) for p in pref_vector], dtype=torch.float32)
            if pref.numel() != self.num_tasks:
                raise ConfigError(
                    f"pref_vector must have one entry per task ({self.num_tasks}), found "
                    f"{pref.numel()}"
                )
            if not bool(torch.isfinite(pref).all()) or bool((pref < 0).any()):
                raise ConfigError(
                    f"pref_vector must hold finite non-negative numbers, found {pref.tolist()}"
                )
        self.register_buffer("pref_vector", pref, persistent=False)

    def preference(self, k: int, like: Tensor) -> Tensor:
        """The preference weights of the ``k`` tasks in the Gramian (uniform ``1/k`` by
        default; with ``pref_vector``, its entries for the present tasks)."""
        if self._uniform:
            return torch.full((k,), 1.0 / k, dtype=like.dtype, device=like.device)
        pref = self.pref_vector.to(like.dtype)
        if k != pref.numel():
            rows = self._rows
            if rows is None or rows.numel() != k:
                raise ValueError(
                    f"pref_vector has {pref.numel()} entries but the Gramian is {k}×{k}"
                )
            pref = pref[rows.to(pref.device)]
        return pref.to(like.device)


@BALANCERS.register(
    "upgrad",
    "average of the gradients projected onto the dual cone, Jacobian descent (Quinton & Rey, 2024)",
)
class UPGrad(_PreferenceMixin):
    """UPGrad (Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", arXiv 2024;
    torchjd): every task gradient is projected onto the dual cone of all of them,
    ``C = {x : <x, g_j> >= 0 for every j}``, and the projections are averaged (weighted by the
    preference ``p``, uniform by default):

        ``d = Σ_i p_i π_C(g_i)``,  in weights ``w = Σ_i v_i`` with
        ``v_i = argmin_{v >= p_i e_i} vᵀ G v``.

    The update conflicts with no task (``<d, g_j> >= 0``), equals the mean when the tasks agree,
    is permutation-invariant and linear under scaling of J. As in torchjd, ``G`` is first
    normalised by its trace (a Jacobian with ``||J||_F² < norm_eps`` is treated as zero, and
    then the update is ``pᵀJ``) and regularised by ``reg_eps · I`` (a unique, stable solution
    for singular ``G``; it allows conflicts of order ``reg_eps · v_j · tr(G)``). The K
    quadratic programs are solved exactly by ``project_onto_dual_cone`` on the CPU in float64
    (moves the K×K Gramian to the host).

    Args:
        pref_vector: one non-negative weight per task (``None``: ``1/K`` over present tasks).
        norm_eps: below this squared Frobenius norm, J counts as zero.
        reg_eps: the ridge added to the normalised Gramian.

    Example:
        >>> J = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])   # <g1, g2> = -1: they conflict
        >>> update, weights = UPGrad(["a", "b"], reg_eps=0.0).aggregate(J, torch.ones(2))
        >>> update   # (π(g1) + π(g2)) / 2 = ((0.5, 0.5) + (0, 1)) / 2
        tensor([0.2500, 0.7500])
        >>> weights
        tensor([1.0000, 0.7500])
    """

    def weights_from_gramian(self, gramian: Tensor, losses: Tensor) -> Tensor:
        k = gramian.shape[0]
        g = regularized_normalized_gramian(
            gramian.detach().to("cpu", torch.float64), norm_eps=self.norm_eps, reg_eps=self.reg_eps
        )
        pref = self.preference(k, g)
        v = project_onto_dual_cone(g, torch.diag(pref))
        return v.sum(dim=0).to(device=gramian.device, dtype=gramian.dtype)

    def extra_repr(self) -> str:
        return f"norm_eps={self.norm_eps}, reg_eps={self.reg_eps}, level={self.level!r}"


__all__ = ["UPGrad", "regularized_normalized_gramian"]
