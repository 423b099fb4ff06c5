"""Real multi-task data sets shipped as small files inside the ``river`` package: ``yeast`` and
``solar-flare`` (read with pandas from the package folder; river itself is never imported)."""

from __future__ import annotations

from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pandas as pd

from polytask.data.sources.common import hide_labels, sanitize
from polytask.data.sources.registry import DATASETS
from polytask.data.table import MultiLabelTable
from polytask.errors import ConfigError, DataError
from polytask.tasks import TaskSpec

YEAST_LABEL_PREFIX = "Class"  # yeast.csv.gz: Att1..Att103 features, then Class1..Class14 labels
SOLAR_TARGETS = ("c-class-flares", "m-class-flares", "x-class-flares")


def river_file(filename: str, dataset: str) -> Path:
    """Path of ``river/datasets/<filename>``, located without importing river."""
    spec = find_spec("river")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"the {dataset} dataset needs the 'river' package: pip install 'polytask[datasets]'"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / filename
    if not path.is_file():
        raise DataError(f"{path}: not found; this 'river' version lacks the {dataset} file")
    return path


@DATASETS.register("yeast", "Yeast gene functions: 103 features, 14 labels (real, from river)")
def yeast(*, seed: int, as_tasks: str = "binary", missing_fraction: float = 0.0) -> MultiLabelTable:
    """The Yeast multi-label data set: 2,417 genes, 103 expression/phylogenetic features and 14
    functional classes. ``as_tasks="binary"`` gives 14 binary tasks ``class1..class14``;
    ``"multilabel"`` gives one multilabel task ``functions`` with 14 labels.

    References:
        Elisseeff, A. and Weston, J., 2001. A kernel method for multi-labelled classification.
        NIPS 14. (File: MULAN version, OpenML 40597, as shipped by the ``river`` package.)
    """
    if as_tasks not in ("binary", "multilabel"):
        raise ConfigError(f"yeast: as_tasks must be 'binary' or 'multilabel', found {as_tasks!r}")
    frame = pd.read_csv(river_file("yeast.csv.gz", "yeast"))
    labels = [c for c in frame.columns if c.startswith(YEAST_LABEL_PREFIX)]
    features = [c for c in frame.columns if c not in labels]
    y = frame[labels].to_numpy(dtype=np.float32)
    if as_tasks == "binary":
        tasks = [TaskSpec(sanitize(c), "binary") for c in labels]
        targets = {task.name: y[:, i].copy() for i, task in enumerate(tasks)}
    else:
        tasks = [TaskSpec("functions", "multilabel", num_classes=len(labels))]
        targets = {"functions": y}
    return MultiLabelTable(
        inputs=frame[features].to_numpy(dtype=np.float32),
        targets=hide_labels(targets, tasks, fraction=missing_fraction, seed=seed),
        tasks=tasks,
        feature_names=features,
        source="yeast",
    )


@DATASETS.register("solar-flare", "Solar Flare: 3 flare counts from 10 categorical features (real)")
def solar_flare(*, seed: int, missing_fraction: float = 0.0) -> MultiLabelTable:
    """The Solar Flare data set (1,066 active regions): every one of the 10 categorical
    attributes one-hot encoded (features ``column=value``), and three regression tasks, the
    counts of C-, M- and X-class flares in the next 24 hours (``c_class_flares`` ...).

    References:
        Bradshaw, G., 1989. Solar Flare. UCI Machine Learning Repository,
        https://doi.org/10.24432/C5530G (file ``flare.data2``, as shipped by ``river``).
    """
    frame = pd.read_csv(river_file("solar-flare.csv.zip", "solar-flare"))
    attributes = [c for c in frame.columns if c not in SOLAR_TARGETS]
    onehot = pd.get_dummies(frame[attributes].astype(str), prefix_sep="=", dtype=np.float32)
    tasks = [TaskSpec(sanitize(c), "regression") for c in SOLAR_TARGETS]
    targets = {
        task.name: frame[c].to_numpy(dtype=np.float32)
        for task, c in zip(tasks, SOLAR_TARGETS, strict=True)
    }
    return MultiLabelTable(
        inputs=onehot.to_numpy(dtype=np.float32),
        targets=hide_labels(targets, tasks, fraction=missing_fraction, seed=seed),
        tasks=tasks,
        feature_names=[str(c) for c in onehot.columns],
        source="solar-flare",
    )
