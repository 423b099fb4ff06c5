"""``DATASETS``: the registry every dataset builder of ``polytask.data.sources`` registers in.

It lives in its own module so that the builders import it from here, not from the package whose
``__init__`` imports them.
"""

from __future__ import annotations

from collections.abc import Callable

from polytask.data.table import MultiLabelTable
from polytask.registry import Registry

DATASETS: Registry[Callable[..., MultiLabelTable]] = Registry("dataset", provided=("seed",))
