"""Gradient aggregation methods, one private module per method (``_mgda.py``, ``_pcgrad.py``...),
each registering itself in ``BALANCERS`` on import."""

from __future__ import annotations

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    if _module.name.startswith("_") and not _module.name.startswith("__"):
        importlib.import_module(f"{__name__}.{_module.name}")
