"""What UPGrad and DualProj share: both project onto the dual cone of the task gradients, on the
trace-normalised, regularised Gramian, with a preference over the tasks."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from polytask.balancing.engine import GramianWeightingAggregator, Level
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


class DualConeProjection(GramianWeightingAggregator):
    """Base of the methods whose weights project onto the dual cone of the task gradients
    (UPGrad, DualProj): a preference vector over all tasks (uniform by default), and the
    Gramian normalised by its trace and regularised (``regularized_normalized_gramian``), in
    float64 on the CPU where the cone projection is solved.

    Args:
        pref_vector: one non-negative weight per task (``None``: ``1/K`` over present tasks).
        norm_eps: below this squared Frobenius norm, J counts as zero.
        reg_eps: a ridge added to the normalised Gramian (default 0: exact; torchjd's 1e-4
            gives a unique, stable solution for singular ``G`` but allows conflicts).
    """

    pref_vector: Tensor

    def __init__(
        self,
        tasks: Sequence[TaskSpec | str],
        *,
        pref_vector: Sequence[float] | None = None,
        norm_eps: float = 1e-4,
        reg_eps: float = 0.0,
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

    def cone_problem(self, gramian: Tensor, rows: Tensor | None) -> tuple[Tensor, Tensor]:
        """(the normalised, regularised float64 CPU Gramian, the preference of its tasks)."""
        g = regularized_normalized_gramian(
            gramian.detach().to("cpu", torch.float64), norm_eps=self.norm_eps, reg_eps=self.reg_eps
        )
        return g, self.preference(g.shape[0], g, rows)

    def preference(self, k: int, like: Tensor, rows: Tensor | None = None) -> Tensor:
        """The preference weights of the ``k`` tasks in the Gramian (uniform ``1/k`` by
        default; with ``pref_vector``, its entries for the tasks ``rows``, all by default)."""
        if self._uniform:
            return torch.full((k,), 1.0 / k, dtype=like.dtype, device=like.device)
        pref = self.pref_vector.to(like.dtype)
        if k != pref.numel():
            if rows is None or rows.numel() != k:
                raise ValueError(
                    f"pref_vector has {pref.numel()} entries but the Gramian is {k}×{k}"
                )
            pref = pref[rows.to(pref.device)]
        return pref.to(like.device)

    def extra_repr(self) -> str:
        return f"norm_eps={self.norm_eps}, reg_eps={self.reg_eps}, level={self.level!r}"


__all__ = ["DualConeProjection", "regularized_normalized_gramian"]
