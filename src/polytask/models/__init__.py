"""nn.Modules only: encoders, task heads and multi-task architectures, each found by name."""

from polytask.models.architectures import (
    ARCHITECTURES,
    HardSharing,
    MultiTaskModel,
    MultiTaskOutput,
)
from polytask.models.builder import build_model
from polytask.models.encoders import ENCODERS, CNNEncoder, MLPEncoder, ResNetEncoder
from polytask.models.heads import HEADS, TaskHead

__all__ = [
    "ARCHITECTURES",
    "ENCODERS",
    "HEADS",
    "CNNEncoder",
    "HardSharing",
    "MLPEncoder",
    "MultiTaskModel",
    "MultiTaskOutput",
    "ResNetEncoder",
    "TaskHead",
    "build_model",
]
