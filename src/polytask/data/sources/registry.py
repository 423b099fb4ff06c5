"""``DATASETS``: the registry every dataset builder of ``polytask.data.sources`` registers in.

It lives in its own module so that the builders import it from here, not from the package whose
``__init__`` imports them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from polytask.data.table import MultiLabelTable
from polytask.registry import Registry

DATASETS: Registry[Callable[..., MultiLabelTable]] = Registry("dataset", provided=("seed",))


def load_dataset(name: str, params: Mapping[str, Any], *, seed: int) -> MultiLabelTable:
    """The table of dataset ``name`` built with ``params``, with its ``fingerprint``: what a
    file-based source records about the file it read, or else the name, parameters and seed
    that generate it.

    >>> load_dataset("mmoe-synthetic", {"num_samples": 50}, seed=0).fingerprint
    {'dataset': 'mmoe-synthetic', 'params': {'num_samples': 50}, 'seed': 0}
    """
    table = DATASETS.get(name)(seed=seed, **params)
    if table.fingerprint is None:
        table.fingerprint = {"dataset": name, "params": dict(params), "seed": seed}
    return table
