"""polytask: multi-task learning for PyTorch — train, balance, evaluate and ship one model for
several tasks."""

from polytask.errors import PolytaskError
from polytask.tasks import TaskSpec

__version__ = "0.1.0"
__all__ = ["PolytaskError", "TaskSpec", "__version__"]
