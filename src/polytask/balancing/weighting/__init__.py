"""Loss weighting methods: the update is the gradient of a weighted sum of the task losses.

One private module per method (``_equal.py``, ``_uncertainty.py``, ``_dwa.py``...), each
registering its class in ``BALANCERS``; shared tensor helpers are in ``_masking.py``.

Every method here works on the K task losses alone (GradNorm also looks at the gradient norms of
the last shared layer), keeps its state in buffers or parameters (so ``state_dict()`` checkpoints
it) and runs as tensor operations on the losses' device, without host synchronisation. Tasks
absent from a batch (``present[k]`` false) contribute exactly 0 and get weight 0.

Methods that take ratios or logarithms of the losses declare ``requires_positive_losses = True``:
they cannot run on log-losses (``transforms.LogLosses``), which are negative below 1.
"""

from polytask.balancing.weighting._dwa import DynamicWeightAverage
from polytask.balancing.weighting._equal import EqualWeighting
from polytask.balancing.weighting._famo import FAMO
from polytask.balancing.weighting._gls import GeometricLossStrategy
from polytask.balancing.weighting._gradnorm import GradNorm
from polytask.balancing.weighting._imtl_l import IMTLL
from polytask.balancing.weighting._masking import masked_softmax
from polytask.balancing.weighting._rlw import RandomLossWeighting
from polytask.balancing.weighting._uncertainty import UncertaintyWeighting

__all__ = [
    "FAMO",
    "IMTLL",
    "DynamicWeightAverage",
    "EqualWeighting",
    "GeometricLossStrategy",
    "GradNorm",
    "RandomLossWeighting",
    "UncertaintyWeighting",
    "masked_softmax",
]
