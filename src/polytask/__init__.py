"""polytask: multi-task learning for PyTorch — train, balance, evaluate and ship one model for
several tasks."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from polytask.errors import PolytaskError

if TYPE_CHECKING:
    from polytask.tasks import TaskSpec

__version__ = "0.1.0"
__all__ = ["PolytaskError", "TaskSpec", "__version__"]


def __getattr__(name: str) -> Any:
    """``TaskSpec`` is imported on first use (PEP 562), so that importing a torch-free part of
    polytask (``polytask.serve.onnx_runtime``) does not import torch."""
    if name == "TaskSpec":
        from polytask.tasks import TaskSpec

        return TaskSpec
    raise AttributeError(f"module 'polytask' has no attribute {name!r}")
