"""How task losses become one update — usable from any PyTorch loop.

Every method is registered in ``BALANCERS`` and built as
``BALANCERS.get(name)(tasks, **params)``.
"""

from polytask.balancing import aggregation
from polytask.balancing.base import BALANCERS, Balancer, BalanceResult, LossWeighting
from polytask.balancing.engine import GradientAggregator, GramianWeightingAggregator
from polytask.balancing.reduce import Reducer
from polytask.balancing.transforms import LogLosses, build_balancer, log_transform
from polytask.balancing.weighting import (
    FAMO,
    IMTLL,
    DynamicWeightAverage,
    EqualWeighting,
    GeometricLossStrategy,
    GradNorm,
    RandomLossWeighting,
    UncertaintyWeighting,
)

__all__ = [
    "BALANCERS",
    "FAMO",
    "IMTLL",
    "BalanceResult",
    "Balancer",
    "DynamicWeightAverage",
    "EqualWeighting",
    "GeometricLossStrategy",
    "GradNorm",
    "GradientAggregator",
    "GramianWeightingAggregator",
    "LogLosses",
    "LossWeighting",
    "RandomLossWeighting",
    "Reducer",
    "UncertaintyWeighting",
    "aggregation",
    "build_balancer",
    "log_transform",
]
