"""Which balancing methods train privately, how, and why the others are refused.

A private step releases one noisy sum of clipped per-record gradients; everything computed from
that sum alone is private by post-processing. A method is therefore supported when its weights
are either independent of the data, or learned through that same privatised gradient, or a
function of the noisy Jacobian only. It is refused when its weights read the batch's loss values
or other unprivatised statistics (see docs/privacy.md for each argument).
"""

from __future__ import annotations

from typing import Literal

from polytask.balancing import Balancer, GradientAggregator, LogLosses, LossWeighting
from polytask.errors import ConfigError

__all__ = ["PRIVATE_METHODS", "REFUSED_METHODS", "PrivateMode", "private_mode"]

#: how a supported method is privatised
PrivateMode = Literal["public", "learned", "aggregation"]

_AGGREGATION = (
    "aggregation: the method aggregates the noisy K×P Jacobian (each record's Jacobian clipped "
    "jointly, one Gaussian mechanism per step), so its update is private by post-processing"
)

#: method → (mode, the argument that makes it private)
PRIVATE_METHODS: dict[str, tuple[PrivateMode, str]] = {
    "equal": ("public", "its weights are constants (1 per task): public"),
    "rlw": ("public", "its weights are drawn from a seeded generator, independent of the data"),
    "uncertainty": (
        "learned",
        "its log-variances are parameters: their per-record gradients are clipped and noised "
        "with the model's, so they are learned from privatised gradients only",
    ),
    "imtl_l": (
        "learned",
        "its log-scales are parameters: their per-record gradients are clipped and noised with "
        "the model's, so they are learned from privatised gradients only",
    ),
    **{
        name: ("aggregation", _AGGREGATION)
        for name in (
            "aligned_mtl",
            "cagrad",
            "db_mtl",
            "dualproj",
            "fairgrad",
            "graddrop",
            "gradvac",
            "imtl_g",
            "mgda",
            "nash_mtl",
            "pcgrad",
            "upgrad",
        )
    },
}

#: method → why it would leak
REFUSED_METHODS: dict[str, str] = {
    "dwa": "its weights are ratios of the batches' average task losses (unprivatised losses)",
    "famo": "its logits move with the change of the batch's task losses (unprivatised losses)",
    "gls": "its weights L/(n·L_k) divide by the batch's task losses (unprivatised losses)",
    "gradnorm": "its weights follow the task gradient norms and loss ratios of the batch "
    "(unprivatised)",
    "mgda_ub": "it needs each record's gradient of the shared representation, which is not a "
    "sum over records (use mgda)",
}


def _refuse(method: str, reason: str) -> ConfigError:
    return ConfigError(f"train.privacy: balancing method {method!r} is not private: {reason}")


def private_mode(method: str, balancer: Balancer) -> PrivateMode:
    """How ``balancer`` (built from the registered ``method``) trains privately; a one-line
    ``ConfigError`` naming the reason when its weights would leak."""
    if isinstance(balancer, LogLosses):
        raise _refuse(
            method,
            "balancing.log_losses divides each task's gradient by the batch's loss "
            "(unprivatised); set log_losses: false",
        )
    if method in REFUSED_METHODS:
        raise _refuse(method, REFUSED_METHODS[method])
    if method not in PRIVATE_METHODS:
        raise _refuse(method, "it has not been analysed for differential privacy")
    mode = PRIVATE_METHODS[method][0]
    if mode == "aggregation":
        assert isinstance(balancer, GradientAggregator)
        if balancer.level != "parameters":
            raise _refuse(
                method,
                "level 'features' needs per-record gradients of the shared representation, "
                "which are not a sum over records; set balancing.params.level: parameters",
            )
        if balancer.update_every != 1:
            raise _refuse(
                method, "update_every > 1 reuses weights with an unclipped backward; set 1"
            )
        if getattr(balancer, "normalization", "none") in ("loss", "loss+"):
            raise _refuse(method, "normalization 'loss'/'loss+' divides by the batch's task losses")
    else:
        assert isinstance(balancer, LossWeighting)
    return mode
