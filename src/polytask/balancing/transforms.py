"""Loss transforms that compose with any balancing method, and ``build_balancer``.

``LogLosses`` replaces each present task's loss ``L_k`` by ``log(L_k + ε)`` before handing the
losses to any other balancer: the loss-scale balancing of DB-MTL (Lin, Ye, Zhang & Tsang,
"Dual-Balancing for Multi-Task Learning", 2023). Each task's gradient becomes
``∇L_k / (L_k + ε)``, which is invariant to the scale of its loss. (DB-MTL proper also balances
the gradient magnitudes; that is a gradient method of its own.)

``build_balancer`` is how a trainer or a configuration builds a balancer from its registry name.

Example:
    >>> import torch
    >>> balancer = build_balancer("equal", ["a", "b"], log_losses=True)
    >>> x = torch.tensor([1.0, 2.0], requires_grad=True)
    >>> result = balancer.backward(torch.stack([x[0] ** 2, 10 * x[1] ** 2]))
    >>> x.grad.tolist()   # d/dx log(x^2) = 2 / x, whatever the factor 10
    [2.0, 1.0]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from polytask.balancing.base import (
    BALANCERS,
    Balancer,
    BalanceResult,
    present_mask,
    stack_losses,
)
from polytask.balancing.reduce import Reducer
from polytask.errors import ConfigError
from polytask.tasks import TaskSpec


def log_transform(losses: Tensor, present: Tensor, eps: float = 1e-8) -> Tensor:
    """``log(L_k + eps)`` on the present tasks (negative losses count as 0), exactly 0 on the
    absent ones (which receive no gradient).

    Example:
        >>> log_transform(torch.tensor([1.0, 5.0]), torch.tensor([True, False])).tolist()
        [0.0, 0.0]
    """
    safe = torch.where(present, losses.clamp_min(0), torch.ones_like(losses))
    logged = torch.log(safe + eps)
    return torch.where(present, logged, torch.zeros_like(logged))


class LogLosses(Balancer):
    """Wrap ``inner`` so that it balances ``log(L_k + eps)`` instead of ``L_k`` (the loss-scale
    balancing of DB-MTL: Lin, Ye, Zhang & Tsang, "Dual-Balancing for Multi-Task Learning", 2023).

    Works with every balancer that accepts losses of any sign: loss weightings weight the
    log-losses, gradient methods receive the Jacobian of the log-losses (rows
    ``∇L_k / (L_k + eps)``). Balancers that declare ``requires_positive_losses`` (they take
    ratios or logs of the losses: DWA, GLS, GradNorm, IMTL-L, FAMO) are refused with a
    ``ConfigError``. Absent tasks stay exactly 0.
    ``shared_params``, ``features``, ``present`` and ``grad_scale`` are passed through;
    ``needs_shared_params``, ``needs_features``, ``supports_grad_scale``,
    ``reduces_own_gradients``, ``attach`` and ``distribute`` are the inner balancer's; the inner
    balancer is a submodule, so ``parameters()`` and ``state_dict()`` (keys prefixed
    ``inner.``) hold its own. Under data parallelism the logarithm is taken of the global loss,
    not of each process's share (``_global_log``).
    The result is the inner balancer's (its ``loss`` is the combined log-loss).

    Example:
        >>> from polytask.balancing.weighting import EqualWeighting
        >>> wrapped = LogLosses(EqualWeighting(["a", "b"]))
        >>> x = torch.tensor([2.0, 3.0], requires_grad=True)
        >>> _ = wrapped.backward(torch.stack([x[0], 100 * x[1]]))
        >>> [round(v, 4) for v in x.grad.tolist()]   # 1 / x
        [0.5, 0.3333]
    """

    def __init__(self, inner: Balancer, *, eps: float = 1e-8) -> None:
        if not isinstance(inner, Balancer):
            raise TypeError(f"LogLosses: inner must be a Balancer, found {type(inner).__name__}")
        if not eps > 0:
            raise ConfigError(f"log_losses: eps must be > 0, found {eps!r}")
        if inner.requires_positive_losses:
            raise ConfigError(
                f"log_losses cannot wrap {type(inner).__name__}: it takes ratios or logs of the "
                "losses, which must be positive, and log-losses are negative below 1; use "
                "log_losses with a method that accepts any sign (equal, rlw, gradient methods)"
            )
        super().__init__(inner.tasks)
        self.inner = inner
        self.eps = float(eps)
        self.needs_shared_params = inner.needs_shared_params  # type: ignore[misc]
        self.needs_features = inner.needs_features  # type: ignore[misc]
        self.supports_grad_scale = inner.supports_grad_scale  # type: ignore[misc]
        self.reduces_own_gradients = inner.reduces_own_gradients  # type: ignore[misc]

    def attach(self, model: nn.Module) -> None:
        self.inner.attach(model)

    def distribute(self, reducer: Reducer | None) -> None:
        """Under data parallelism the inner balancer reduces (its method sees the global
        log-losses, as on one process with the whole batch)."""
        super().distribute(reducer)
        self.inner.distribute(reducer)

    def backward(
        self,
        losses: Mapping[str, Tensor] | Sequence[Tensor] | Tensor,
        *,
        shared_params: Sequence[Tensor] | None = None,
        features: Tensor | None = None,
        present: Tensor | None = None,
        grad_scale: Tensor | float = 1.0,
    ) -> BalanceResult:
        vector = stack_losses(self.task_names, losses)
        present = present_mask(vector, present)
        logged = (
            log_transform(vector, present, self.eps)
            if self.reducer is None
            else self._global_log(vector, present)
        )
        return self.inner.backward(
            logged,
            shared_params=shared_params,
            features=features,
            present=present,
            grad_scale=grad_scale,
        )

    def _global_log(self, vector: Tensor, present: Tensor) -> Tensor:
        """Each process's stand-in for ``log(L̄_k + eps)``, ``L̄`` the global loss (the mean of the
        processes' surrogates): its value is ``log(L̄_k + eps)`` on every process and its
        gradient ``∇L_k^local / (L̄_k + eps)`` averages over the processes to
        ``∇L̄_k / (L̄_k + eps)`` — what one process with the whole batch computes. The log of a
        process's own share would weigh each share by its own loss instead."""
        assert self.reducer is not None
        mean = self.reducer.mean(vector.detach())
        slope = torch.where(
            present & (mean >= 0), 1.0 / (mean.clamp_min(0) + self.eps), torch.zeros_like(mean)
        )
        return log_transform(mean, present, self.eps) + (vector - vector.detach()) * slope


def build_balancer(
    method: str,
    tasks: Sequence[TaskSpec | str],
    *,
    params: Mapping[str, Any] | None = None,
    log_losses: bool = False,
) -> Balancer:
    """The balancer registered as ``method`` built for ``tasks`` with the keyword ``params``,
    wrapped in ``LogLosses`` when ``log_losses`` is true.

    Raises ``UnknownNameError`` (listing the known methods) for an unknown name and
    ``ConfigError`` naming every unknown or missing parameter.

    Example:
        >>> b = build_balancer("uncertainty", ["a", "b"], params={"init_log_var": 0.5})
        >>> type(b).__name__
        'UncertaintyWeighting'
        >>> type(build_balancer("equal", ["a"], log_losses=True)).__name__
        'LogLosses'
    """
    builder = BALANCERS.get(method)
    params = dict(params or {})
    problems = BALANCERS.check_params(method, params)
    if problems:
        raise ConfigError("; ".join(problems))
    balancer = builder(list(tasks), **params)
    return LogLosses(balancer) if log_losses else balancer
