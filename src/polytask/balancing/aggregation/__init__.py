"""Gradient aggregation methods, one private module per method (``_mgda.py``, ``_upgrad.py``...),
each registering its class in ``BALANCERS`` on import. Gramian weightings subclass
``engine.GramianWeightingAggregator``; the others ``engine.GradientAggregator``."""

from polytask.balancing.aggregation._aligned_mtl import AlignedMTL
from polytask.balancing.aggregation._cagrad import CAGrad
from polytask.balancing.aggregation._dbmtl import DBMTL
from polytask.balancing.aggregation._dual_cone import DualConeProjection
from polytask.balancing.aggregation._dualproj import DualProj
from polytask.balancing.aggregation._fairgrad import FairGrad
from polytask.balancing.aggregation._graddrop import GradDrop
from polytask.balancing.aggregation._gradvac import GradVac
from polytask.balancing.aggregation._imtl_g import IMTLG
from polytask.balancing.aggregation._mgda import MGDA, MGDAUB
from polytask.balancing.aggregation._nash_mtl import NashMTL
from polytask.balancing.aggregation._pcgrad import PCGrad
from polytask.balancing.aggregation._upgrad import UPGrad

__all__ = [
    "DBMTL",
    "IMTLG",
    "MGDA",
    "MGDAUB",
    "AlignedMTL",
    "CAGrad",
    "DualConeProjection",
    "DualProj",
    "FairGrad",
    "GradDrop",
    "GradVac",
    "NashMTL",
    "PCGrad",
    "UPGrad",
]
