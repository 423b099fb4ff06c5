"""DB-MTL's gradient-magnitude balancing: every task's (EMA) gradient scaled to the largest norm."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from polytask.balancing.base import BALANCERS
from polytask.balancing.engine import GradientAggregator, Level, present_rows
from polytask.errors import ConfigError
from polytask.tasks import TaskSpec

#: a task's EMA norm is floored at this fraction of the largest one before dividing by it
RELATIVE_FLOOR = 1e-12


@BALANCERS.register(
    "db_mtl",
    "DB-MTL gradient-magnitude balancing: EMA task gradients scaled to the largest norm (Lin, "
    "Ye, Xu, Shi & Zhang, 2023)",
)
class DBMTL(GradientAggregator):
    """The gradient side of DB-MTL (Lin, Ye, Xu, Shi & Zhang, "Dual-Balancing for Multi-Task
    Learning", arXiv 2308.12029, 2023).

    DB-MTL balances the loss scales by back-propagating the log-transformed losses
    ``log L_i`` (a loss preprocessing step, not done here) and the gradient magnitudes by this
    aggregator: each task keeps an exponential moving average of its gradient,

        ``ĝ_i ← β_t ĝ_i + (1 − β_t) g_i``,   ``β_t = beta / (t + 1)^beta_sigma``

    (``t = 0, 1, ...`` counts the calls, ``ĝ_i`` starts at zero, no bias correction, as in
    LibMTL's implementation), and the update gives every task the largest EMA norm:

        ``d = Σ_i (max_j ‖ĝ_j‖ / ‖ĝ_i‖) ĝ_i``.

    So DB-MTL = log-transformed losses + this aggregator. The reported weights are the factors
    ``max_j ‖ĝ_j‖ / ‖ĝ_i‖`` (the update mixes the current gradient with the EMA, so it is not
    ``weights @ J``). A task whose EMA is zero (a zero gradient so far) gets factor 0; a norm
    below ``1e-12`` times the largest is floored there before dividing; all EMAs zero: ones.

    State and memory: the EMA ``grad_ema`` is a K×P buffer (P = number of shared parameters, in
    the Jacobian's dtype), i.e. K extra copies of the shared parameters, allocated at the first
    step and saved in ``state_dict``, with the call counter ``ema_steps``. Only the shared
    parameters (``level="parameters"``) are supported: feature gradients change meaning (and
    size) with every batch. Tasks absent from a step keep their EMA and take no part in the max.
    LibMTL's command line defaults ``beta_sigma`` to 0 (a constant β).

    Numerical guarantee: ``d = Σ_i (max_j ||ĝ_j|| / ||ĝ_i||) ĝ_i`` over the non-zero EMAs, to
    ``20·K²·eps·max_j ||ĝ_j||``, on gradient norms from 1e-4 to 1e4 in one matrix, zero,
    duplicated and near-opposite gradients, K from 2 to 10, P up to 1000, float32 and float64
    (``tests/balancing/aggregation/test_numerical_guarantees.py``).

    Args:
        tasks: the tasks, in the order of the losses.
        beta: the EMA factor β (in [0, 1)).
        beta_sigma: the decay exponent σ of ``β_t = beta / (t+1)^σ`` (≥ 0).
        level: must be ``parameters``.
        update_every: must be 1 (the update is not a fixed weighting of the gradients).

    Example:
        >>> agg = DBMTL(["a", "b"])
        >>> jacobian = torch.tensor([[3.0, 4.0], [0.0, 1.0]])  # norms 5 and 1
        >>> update, weights = agg.aggregate(jacobian, torch.ones(2))
        >>> # t = 0: β_0 = 0.9, ĝ = 0.1 g: norms 0.5 and 0.1, factors 1 and 5
        >>> [round(w, 4) for w in weights.tolist()], [round(u, 4) for u in update.tolist()]
        ([1.0, 5.0], [0.3, 0.9])
    """

    grad_ema: Tensor
    ema_steps: Tensor

    def __init__(
        self,
        tasks: Sequence[TaskSpec | str],
        *,
        beta: float = 0.9,
        beta_sigma: float = 0.5,
        level: Level = "parameters",
        update_every: int = 1,
    ) -> None:
        if level != "parameters":
            raise ConfigError(
                f"db_mtl keeps an EMA of each task's gradient of the shared parameters; level "
                f"must be 'parameters', found {level!r}"
            )
        super().__init__(tasks, level=level, update_every=update_every)
        if not 0.0 <= beta < 1.0:
            raise ConfigError(f"beta must be in [0, 1), found {beta}")
        if beta_sigma < 0:
            raise ConfigError(f"beta_sigma must be >= 0, found {beta_sigma}")
        self.beta = float(beta)
        self.beta_sigma = float(beta_sigma)
        self.register_buffer("grad_ema", torch.zeros(self.num_tasks, 0))
        self.register_buffer("ema_steps", torch.zeros((), dtype=torch.long))

    def aggregate(
        self, jacobian: Tensor, losses: Tensor, rows: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """(update, factors) for the Jacobian of the tasks ``rows`` (all tasks by default)."""
        k, p = jacobian.shape
        index = present_rows(k, self.num_tasks, rows, "DBMTL")
        index = index.to(jacobian.device)
        if self.grad_ema.shape[1] != p:
            if self.grad_ema.shape[1] != 0:
                raise ValueError(
                    f"DBMTL: the Jacobian has {p} columns but the gradient EMA has "
                    f"{self.grad_ema.shape[1]} (the shared parameters changed)"
                )
            self.grad_ema = jacobian.new_zeros(self.num_tasks, p)
        ema = self.grad_ema.to(jacobian.dtype)
        beta_t = self.beta / (self.ema_steps.to(torch.float64) + 1.0) ** self.beta_sigma
        beta_t = beta_t.to(jacobian.dtype)
        rows_ema = beta_t * ema[index] + (1.0 - beta_t) * jacobian.detach()
        self.grad_ema[index] = rows_ema.to(self.grad_ema.dtype)
        self.ema_steps += 1
        norms = torch.linalg.vector_norm(rows_ema.to(torch.float64), dim=1)
        top = norms.max()
        floor = (top * RELATIVE_FLOOR).clamp_min(torch.finfo(norms.dtype).tiny)
        factors = torch.where(norms > 0, top / norms.clamp_min(floor), torch.zeros_like(norms))
        factors = torch.where(top > 0, factors, torch.ones_like(factors)).to(jacobian.dtype)
        return factors @ rows_ema, factors

    def _load_from_state_dict(
        self, state_dict: Mapping[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        # the EMA's width is only known after the first step: take the saved shape
        saved = state_dict.get(prefix + "grad_ema")
        if isinstance(saved, Tensor) and saved.shape != self.grad_ema.shape:
            self.grad_ema = torch.zeros(saved.shape, dtype=saved.dtype, device=self.grad_ema.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
