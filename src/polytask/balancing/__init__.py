"""How task losses become one update — usable from any PyTorch loop.

Every method is registered in ``BALANCERS`` and built as
``BALANCERS.get(name)(tasks, **params)``.
"""

from polytask.balancing import aggregators
from polytask.balancing.base import BALANCERS, Balancer, BalanceResult, LossWeighting
from polytask.balancing.gradient import GradientAggregator, GramianWeightingAggregator
from polytask.balancing.weighting import EqualWeighting, UncertaintyWeighting

__all__ = [
    "BALANCERS",
    "BalanceResult",
    "Balancer",
    "EqualWeighting",
    "GradientAggregator",
    "GramianWeightingAggregator",
    "LossWeighting",
    "UncertaintyWeighting",
    "aggregators",
]
