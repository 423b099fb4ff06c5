"""``nyuv2`` and ``cityscapes``: the preprocessed ``.npy`` folders of the MTAN (Liu, Johns &
Davison, CVPR 2019) and LibMTL repositories, read from a folder the user points to.

Layouts (``<i>`` = 0, 1, …; arrays as those repositories store them, channels last):

* NYUv2, 288×384: ``{train,val}/{image,label,depth,normal}/<i>.npy`` — image ``[H, W, 3]``,
  label ``[H, W]`` (13 classes, ``-1`` = ignored), depth ``[H, W, 1]`` (0 = no reading), normal
  ``[H, W, 3]``; 795 training and 654 validation scenes.
* Cityscapes, 128×256: ``{train,val}/{image,label_7,label_19,depth}/<i>.npy`` — the same, with
  7 or 19 classes (``classes``); 2975 training and 500 validation scenes.

As in those papers the ``val`` folder is the test split; a seeded ``val_fraction`` of the
training scenes is held out for validation (early stopping). With ``check_counts`` (default) a
folder whose file count differs from the published one is refused, naming the folder.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from polytask.data.sources.common import check_fraction, rng_for
from polytask.data.sources.registry import DATASETS
from polytask.data.table import MultiLabelTable
from polytask.errors import ConfigError, DataError
from polytask.tasks import TaskSpec

NYUV2_SHAPE = (288, 384)
CITYSCAPES_SHAPE = (128, 256)
NYUV2_COUNTS = {"train": 795, "val": 654}
CITYSCAPES_COUNTS = {"train": 2975, "val": 500}
#: per kind of array: channels (None: a 2-D label map)
CHANNELS = {"image": 3, "label": None, "depth": 1, "normal": 3}


def layout_files(root: Path, part: str, folder: str, expected: int | None) -> list[Path]:
    """The files ``root/part/folder/0.npy … <n-1>.npy`` in order (``DataError`` naming the
    folder when a number is missing, the count differs from ``expected`` or there are none)."""
    where = root / part / folder
    files = sorted(where.glob("*.npy"), key=lambda p: (len(p.stem), p.stem))
    names = [p.stem for p in files]
    if names != [str(i) for i in range(len(files))]:
        raise DataError(f"{where}: files must be 0.npy … {len(files) - 1}.npy without gaps")
    if expected is not None and len(files) != expected:
        raise DataError(
            f"{where}: {len(files)} files, expected {expected} (check_counts: false to accept)"
        )
    if not files:
        raise DataError(f"{where}: no .npy files")
    return files


def read_array(path: Path, kind: str, shape: tuple[int, int], *, mmap: bool = False) -> np.ndarray:
    """One array of the layout, channels-first (a 2-D depth map gets its channel); ``DataError``
    naming the file when its shape is not the layout's. With ``mmap`` the file is mapped, not
    read (the returned view reads it when used)."""
    array = np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)
    channels = CHANNELS[kind]
    if channels is not None and array.shape == shape:  # a 2-D depth map
        array = array[..., None]
    wanted = shape if channels is None else (*shape, channels)
    if array.shape != wanted:
        raise DataError(f"{path}: shape {array.shape}, expected {wanted}")
    return array if channels is None else np.moveaxis(array, -1, 0)


def _load_folder(
    root: Path, part: str, folder: str, kind: str, shape: tuple[int, int], expected: int | None
) -> np.ndarray:
    """The arrays ``root/part/folder/<i>.npy`` stacked channels-first, checked against the
    layout (``DataError`` naming the folder or file)."""
    return np.stack(
        [read_array(p, kind, shape) for p in layout_files(root, part, folder, expected)]
    )


def check_layout(root: Path, name: str, folders: dict[str, str], kinds: Iterable[str]) -> None:
    """``DataError`` naming the first missing ``{train,val}/<folder>`` of the layout."""
    kinds = list(kinds)
    for part in ("train", "val"):
        for key in kinds:
            if not (root / part / folders[key]).is_dir():
                raise DataError(
                    f"{name}: missing folder {root / part / folders[key]} (expected "
                    f"{{train,val}}/{{{','.join(folders[k] for k in kinds)}}}/<i>.npy)"
                )


def layout_split(n_train: int, n_test: int, *, val_fraction: float, seed: int) -> np.ndarray:
    """Split codes: the ``train`` scenes (a seeded ``val_fraction`` of them held out for
    validation) then the ``val`` folder's scenes, the test split."""
    split = np.concatenate([np.zeros(n_train, np.int8), np.full(n_test, 2, np.int8)])
    held_out = rng_for(seed, 0).permutation(n_train)[: round(val_fraction * n_train)]
    split[held_out] = 1
    return split


def load_dense_folder(
    path: str,
    *,
    name: str,
    folders: dict[str, str],
    tasks: list[TaskSpec],
    shape: tuple[int, int],
    counts: dict[str, int] | None,
    val_fraction: float,
    seed: int,
) -> MultiLabelTable:
    """A table from ``path/{train,val}/<folder>/<i>.npy``; ``folders`` maps the task names (and
    ``image``) to their folder names."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DataError(f"{name}: {root} is not a folder")
    check_fraction("val_fraction", val_fraction)
    parts: dict[str, dict[str, np.ndarray]] = {}
    kinds = {"image": "image", **{t.name: array_kind(t) for t in tasks}}
    check_layout(root, name, folders, kinds)  # the whole layout first: no time reading a wrong one
    for part in ("train", "val"):
        expected = counts[part] if counts is not None else None
        parts[part] = {
            key: _load_folder(root, part, folders[key], kinds[key], shape, expected)
            for key in kinds
        }
    n_train, n_test = len(parts["train"]["image"]), len(parts["val"]["image"])
    split = layout_split(n_train, n_test, val_fraction=val_fraction, seed=seed)
    targets = {}
    for task in tasks:
        y = np.concatenate([parts["train"][task.name], parts["val"][task.name]])
        if task.kind == "segmentation":
            y = np.where(y < 0, -1, y).astype(np.int64)
            bad = np.flatnonzero(y.reshape(len(y), -1).max(axis=1) >= task.num_classes)
            if len(bad):
                raise DataError(f"{name}: scene {int(bad[0])}: class above {task.num_classes - 1}")
        targets[task.name] = y.astype(np.int64 if task.kind == "segmentation" else np.float32)
    images = np.concatenate([parts["train"]["image"], parts["val"]["image"]]).astype(np.float32)
    return MultiLabelTable(images, targets, tasks, split=split, source=f"{name} ({root})")


def array_kind(task: TaskSpec) -> str:
    """Which array of the layout holds ``task``'s labels (``label``, ``depth``, ``normal``)."""
    return {"segmentation": "label", "depth": "depth", "normals": "normal"}[task.kind]


@dataclass(frozen=True)
class DenseLayout:
    """One dataset's ``.npy`` layout: its tasks, the folder of the images and of each task's
    labels, the scene shape and the published file counts."""

    name: str
    tasks: list[TaskSpec]
    folders: dict[str, str]
    shape: tuple[int, int]
    counts: dict[str, int]


def nyuv2_layout() -> DenseLayout:
    """NYUv2's layout: 13 classes, depth and surface normals at 288×384."""
    tasks = [
        TaskSpec("segment", "segmentation", num_classes=13),
        TaskSpec("depth", "depth"),
        TaskSpec("normal", "normals", num_classes=3),
    ]
    folders = {"image": "image", "segment": "label", "depth": "depth", "normal": "normal"}
    return DenseLayout("nyuv2", tasks, folders, NYUV2_SHAPE, NYUV2_COUNTS)


def cityscapes_layout(classes: int) -> DenseLayout:
    """Cityscapes' layout: 7 or 19 classes and depth at 128×256."""
    if classes not in (7, 19):
        raise ConfigError(f"cityscapes: classes must be 7 or 19, found {classes}")
    tasks = [TaskSpec("segment", "segmentation", num_classes=classes), TaskSpec("depth", "depth")]
    folders = {"image": "image", "segment": f"label_{classes}", "depth": "depth"}
    return DenseLayout("cityscapes", tasks, folders, CITYSCAPES_SHAPE, CITYSCAPES_COUNTS)


def _load_layout(
    path: str, layout: DenseLayout, *, check_counts: bool, val_fraction: float, seed: int
) -> MultiLabelTable:
    return load_dense_folder(
        path,
        name=layout.name,
        folders=layout.folders,
        tasks=layout.tasks,
        shape=layout.shape,
        counts=layout.counts if check_counts else None,
        val_fraction=val_fraction,
        seed=seed,
    )


@DATASETS.register("nyuv2", "NYUv2 (13 classes, depth, normals), MTAN/LibMTL .npy layout")
def nyuv2(
    *, seed: int, path: str, check_counts: bool = True, val_fraction: float = 0.1
) -> MultiLabelTable:
    """NYUv2 from ``path`` in the MTAN/LibMTL preprocessed layout (288×384)."""
    return _load_layout(
        path, nyuv2_layout(), check_counts=check_counts, val_fraction=val_fraction, seed=seed
    )


@DATASETS.register("cityscapes", "Cityscapes (7 or 19 classes, depth), MTAN/LibMTL .npy layout")
def cityscapes(
    *,
    seed: int,
    path: str,
    classes: int = 7,
    check_counts: bool = True,
    val_fraction: float = 0.1,
) -> MultiLabelTable:
    """Cityscapes from ``path`` in the MTAN/LibMTL preprocessed layout (128×256)."""
    layout = cityscapes_layout(classes)
    return _load_layout(
        path, layout, check_counts=check_counts, val_fraction=val_fraction, seed=seed
    )
