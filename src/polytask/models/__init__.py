"""nn.Modules only: encoders, task heads and multi-task architectures, each found by name."""

# importing a module registers its encoders: modalities, then pretrained backbones
from polytask.models import audio, dense, efficientnet, fusion, hf_text, resnet, text  # noqa: F401
from polytask.models.architectures import (
    ARCHITECTURES,
    HardSharing,
    MultiTaskModel,
    MultiTaskOutput,
)
from polytask.models.builder import build_model
from polytask.models.cross_stitch import CrossStitch, encoder_stages
from polytask.models.encoders import ENCODERS, CNNEncoder, MLPEncoder, ResNetEncoder
from polytask.models.esmm import ESMM, ctcvr_logit
from polytask.models.experts import CGC, GATES, PLE, DSelectKGate, MMoE
from polytask.models.heads import HEADS, TaskHead
from polytask.models.mtan import MTAN
from polytask.models.tabular import TabularEncoder

__all__ = [
    "ARCHITECTURES",
    "CGC",
    "ENCODERS",
    "ESMM",
    "GATES",
    "HEADS",
    "MTAN",
    "PLE",
    "CNNEncoder",
    "CrossStitch",
    "DSelectKGate",
    "HardSharing",
    "MLPEncoder",
    "MMoE",
    "MultiTaskModel",
    "MultiTaskOutput",
    "ResNetEncoder",
    "TabularEncoder",
    "TaskHead",
    "build_model",
    "ctcvr_logit",
    "encoder_stages",
]
