"""``celeba``: CelebA's 40 binary face attributes (Liu, Luo, Wang & Tang, ICCV 2015), read from the
official aligned-and-cropped release in a folder the user points to (nothing is downloaded).

Layout of ``path`` (after unzipping ``img_align_celeba.zip``; each part may also lie in the
subfolder the CelebA site's release puts it in: ``Img/``, ``Anno/``, ``Eval/``):

* ``img_align_celeba/000001.jpg`` … ``202599.jpg``: 178×218 JPEG faces;
* ``list_attr_celeba.txt``: line 1 the number of images, line 2 the 40 attribute names, then one
  line per image: the file name and 40 values, ``1`` (has it) or ``-1``, separated by one or more
  spaces;
* ``list_eval_partition.txt``: one line per image, the file name and ``0`` (train), ``1`` (val)
  or ``2`` (test) — the split used by the papers (162,770 / 19,867 / 19,962 images).

Each attribute is a ``binary`` task named as in the file (``5_o_Clock_Shadow``, ``Smiling``,
``Male`` …; ``-1`` becomes 0). As in the multi-task papers on CelebA (Sener & Koltun, NeurIPS
2018; FAMO: Liu, Liu, Stone & Liu, NeurIPS 2023) images are resized to 64×64 by default.

Images are held in memory (float32 ``[N, 3, H, W]`` in ``[0, 1]``, as ``image-folder``: 48 KiB per
64×64 image, about 9.3 GiB for all 202,599 before the bundle's normalised copy), so ``limit``
keeps a subset of each split for a machine without that much memory. ``select_celeba`` gives the
kept rows, tasks and labels without decoding any image, for a reader that streams the images
batch by batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from polytask.data.images import ChannelNormalizer, read_image_folder
from polytask.data.sources.registry import DATASETS
from polytask.data.table import SPLITS, MultiLabelTable
from polytask.errors import ConfigError, DataError, unknown_name
from polytask.tasks import TaskSpec

IMAGES_FOLDER = "img_align_celeba"
ATTRIBUTES_FILE = "list_attr_celeba.txt"
PARTITION_FILE = "list_eval_partition.txt"
NUM_ATTRIBUTES = 40
#: the subfolder of each part in the release as the CelebA site distributes it
RELEASE_FOLDERS = {IMAGES_FOLDER: "Img", ATTRIBUTES_FILE: "Anno", PARTITION_FILE: "Eval"}
#: the official release: images per split (train, val, test); 202,599 in all
CELEBA_COUNTS = {"train": 162_770, "val": 19_867, "test": 19_962}


@dataclass(frozen=True)
class CelebaIndex:
    """What CelebA's two text files say: the image files, their split codes (0 train, 1 val,
    2 test), the attribute names and the labels (float32 ``[N, 40]`` of 0/1), in the order of the
    attribute file."""

    folder: Path
    files: list[str]
    split: np.ndarray
    names: list[str]
    labels: np.ndarray


def _read_lines(path: Path) -> list[tuple[int, list[str]]]:
    """The non-blank lines of a text file as (line number from 1, whitespace-separated fields)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not a text file ({exc})") from exc
    return [(i, line.split()) for i, line in enumerate(text.splitlines(), 1) if line.strip()]


def read_attribute_file(path: Path) -> tuple[list[str], list[str], np.ndarray]:
    """The attribute names, the image files and their labels (float32 ``[N, 40]``, ``-1`` → 0)
    of a ``list_attr_celeba.txt``; ``DataError`` naming the file and line of a problem."""
    lines = _read_lines(path)
    if len(lines) < 2:
        raise DataError(f"{path}: expected the image count on line 1 and the attribute names next")
    (_, first), (_, names) = lines[0], lines[1]
    if len(first) != 1 or not first[0].isdigit():
        raise DataError(f"{path}: line 1 must be the number of images, found {' '.join(first)!r}")
    if len(names) != NUM_ATTRIBUTES:
        raise DataError(
            f"{path}: line 2 must name the {NUM_ATTRIBUTES} attributes, found {len(names)} names"
        )
    if len(set(names)) != len(names):
        raise DataError(f"{path}: line 2 names an attribute twice")
    rows = lines[2:]
    for number, fields in rows:
        if len(fields) != NUM_ATTRIBUTES + 1:
            raise DataError(
                f"{path}: line {number}: {len(fields) - 1} values after the file name, "
                f"expected {NUM_ATTRIBUTES}"
            )
    if int(first[0]) != len(rows):
        raise DataError(f"{path}: line 1 says {int(first[0])} images, found {len(rows)} lines")
    values = np.array([fields[1:] for _, fields in rows], dtype=str).reshape(-1, NUM_ATTRIBUTES)
    positive = values == "1"
    bad = np.argwhere(~positive & (values != "-1"))
    if len(bad):
        i, j = (int(v) for v in bad[0])
        found = str(values[i, j])
        raise DataError(
            f"{path}: line {rows[i][0]}, attribute {names[j]!r}: value {found!r} must be 1 or -1"
        )
    files = [fields[0] for _, fields in rows]
    _check_unique(path, files)
    return names, files, positive.astype(np.float32)


def read_partition_file(path: Path) -> dict[str, int]:
    """Image file → split code (0 train, 1 val, 2 test) of a ``list_eval_partition.txt``."""
    split: dict[str, int] = {}
    for number, fields in _read_lines(path):
        if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
            raise DataError(
                f"{path}: line {number}: expected '<file> <0|1|2>', found {' '.join(fields)!r}"
            )
        if fields[0] in split:
            raise DataError(f"{path}: line {number}: {fields[0]} is listed twice")
        split[fields[0]] = int(fields[1])
    return split


def _check_unique(path: Path, files: Sequence[str]) -> None:
    """``DataError`` naming the first file listed twice."""
    seen: set[str] = set()
    for name in files:
        if name in seen:
            raise DataError(f"{path}: {name} is listed twice")
        seen.add(name)


def _locate(root: Path, name: str) -> Path:
    """Where ``name`` (the image folder or a text file) lies in ``root``: at its top, or in the
    subfolder of the release as the CelebA site distributes it (``Img/``, ``Anno/``, ``Eval/``)."""
    places = [root / name, root / RELEASE_FOLDERS[name] / name]
    is_folder = name == IMAGES_FOLDER
    found = next((p for p in places if (p.is_dir() if is_folder else p.is_file())), None)
    if found is None:
        what = "folder" if is_folder else "file"
        raise DataError(f"celeba: missing {what} {places[0]} (or {places[1]})")
    return found


def read_celeba_index(path: str, *, check_counts: bool = True) -> CelebaIndex:
    """The files, splits and labels of the CelebA folder ``path`` (no image is read); with
    ``check_counts`` the official counts are required. ``DataError`` names the file at fault."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DataError(f"celeba: {root} is not a folder")
    folder, attributes_path, partition_path = (
        _locate(root, name) for name in (IMAGES_FOLDER, ATTRIBUTES_FILE, PARTITION_FILE)
    )
    names, files, labels = read_attribute_file(attributes_path)
    partition = read_partition_file(partition_path)
    labelled = set(files)
    unlabelled = [f for f in partition if f not in labelled]
    if unlabelled:
        raise DataError(
            f"{partition_path}: {len(unlabelled)} file(s) not in {ATTRIBUTES_FILE}, "
            f"the first {unlabelled[0]}"
        )
    unsplit = [f for f in files if f not in partition]
    if unsplit:
        raise DataError(
            f"{attributes_path}: {len(unsplit)} file(s) not in {PARTITION_FILE}, "
            f"the first {unsplit[0]}"
        )
    split = np.array([partition[f] for f in files], dtype=np.int8)
    if check_counts:
        _check_counts(partition_path, folder, split)
    return CelebaIndex(folder, files, split, names, labels)


def _check_counts(partition_path: Path, folder: Path, split: np.ndarray) -> None:
    """``DataError`` unless the partition and the image folder hold the official counts."""
    for code, part in enumerate(SPLITS):
        found, expected = int((split == code).sum()), CELEBA_COUNTS[part]
        if found != expected:
            raise DataError(
                f"{partition_path}: {found} {part} images, expected {expected:,} "
                "(check_counts: false to accept another number)"
            )
    expected = sum(CELEBA_COUNTS.values())
    found = sum(1 for _ in folder.iterdir())
    if found != expected:
        raise DataError(
            f"{folder}: {found} files, expected {expected:,} "
            "(check_counts: false to accept another number)"
        )


def limited_rows(split: np.ndarray, limit: int | float | None) -> np.ndarray:
    """The rows kept of each split, in file order: the first ``limit`` of each (an integer), or
    the first ``ceil(limit × count)`` (a fraction in (0, 1]); every row for ``None``.

    Example:
        >>> limited_rows(np.array([0, 0, 0, 1, 2, 0, 2]), 2).tolist()
        [0, 1, 3, 4, 6]
        >>> limited_rows(np.array([0, 0, 0, 1, 2, 0, 2]), 0.5).tolist()
        [0, 1, 3, 4]
    """
    if limit is None:
        return np.arange(len(split))
    if isinstance(limit, bool) or not (
        (isinstance(limit, int) and limit >= 1) or (isinstance(limit, float) and 0.0 < limit <= 1.0)
    ):
        raise ConfigError(
            f"celeba: limit must be an integer >= 1 (images per split) or a fraction in (0, 1], "
            f"found {limit!r}"
        )
    kept = []
    for code in range(len(SPLITS)):
        rows = np.flatnonzero(split == code)
        count = limit if isinstance(limit, int) else math.ceil(limit * len(rows))
        kept.append(rows[:count])
    return np.sort(np.concatenate(kept))


def attribute_columns(names: Sequence[str], attributes: Sequence[str] | None) -> list[int]:
    """The columns of ``attributes`` among ``names`` (every column for ``None``); one
    ``ConfigError`` naming every unknown attribute and the valid ones."""
    if attributes is None:
        return list(range(len(names)))
    if isinstance(attributes, str) or not attributes:
        raise ConfigError("celeba: attributes must be a non-empty list of attribute names")
    unknown = [a for a in attributes if a not in names]
    if unknown:
        raise ConfigError(f"celeba: {unknown_name('attribute', unknown, names)}")
    if len(set(attributes)) != len(attributes):
        raise ConfigError("celeba: attributes names an attribute twice")
    return [list(names).index(a) for a in attributes]


def check_size(size: Sequence[int]) -> tuple[int, int]:
    """``size`` as ``(height, width)``; ``ConfigError`` unless two positive integers."""
    if len(size) != 2 or min(int(s) for s in size) < 1:
        raise ConfigError(f"celeba: size must be [height, width], found {list(size)}")
    return int(size[0]), int(size[1])


@dataclass(frozen=True)
class CelebaSelection:
    """The images a ``celeba`` configuration keeps: ``rows`` of ``index`` (sorted), the tasks, and
    per task the labels of every row of the index."""

    index: CelebaIndex
    rows: np.ndarray
    tasks: list[TaskSpec]
    labels: dict[str, np.ndarray]

    @property
    def files(self) -> list[str]:
        """The kept image files, in row order."""
        return [self.index.files[i] for i in self.rows]


def select_celeba(
    path: str,
    *,
    attributes: Sequence[str] | None = None,
    limit: int | float | None = None,
    check_counts: bool = True,
) -> CelebaSelection:
    """The rows, tasks and labels that ``celeba`` with these parameters reads (no image is
    decoded); ``DataError`` naming the first kept image that is missing from the folder."""
    index = read_celeba_index(path, check_counts=check_counts)
    columns = attribute_columns(index.names, attributes)
    selection = CelebaSelection(
        index,
        limited_rows(index.split, limit),
        [TaskSpec(index.names[j], "binary") for j in columns],
        {index.names[j]: np.ascontiguousarray(index.labels[:, j]) for j in columns},
    )
    missing = next((f for f in selection.files if not (index.folder / f).is_file()), None)
    if missing is not None:
        raise DataError(f"{index.folder / missing}: listed in {ATTRIBUTES_FILE} but missing")
    return selection


@DATASETS.register("celeba", "CelebA (40 binary face attributes) from the official image folder")
def celeba(
    *,
    seed: int,
    path: str,
    size: list[int] | tuple[int, int] = (64, 64),
    attributes: list[str] | None = None,
    limit: int | float | None = None,
    normalize: bool = True,
    check_counts: bool = True,
) -> MultiLabelTable:
    """CelebA from ``path`` (the official layout, see the module): one ``binary`` task per
    attribute (``attributes``: a subset of the names, in that order; all 40 by default), the
    official train/val/test partition, RGB images resized to ``size`` ``[height, width]``.

    ``limit`` keeps the first ``limit`` images of each split, or the first fraction of each
    (``0.1``); ``check_counts`` (default) refuses a folder whose files do not hold the official
    202,599 images; ``normalize`` standardises each channel with the training images' mean and
    standard deviation (``channel_norm``; set it to false for a pretrained backbone, which takes
    ``[0, 1]`` pixels and applies its own statistics). ``seed`` is unused: the folder is the data.

    References:
        Liu, Z., Luo, P., Wang, X. & Tang, X., 2015. Deep Learning Face Attributes in the Wild.
        ICCV 2015 (the dataset). Sener, O. & Koltun, V., 2018. Multi-Task Learning as
        Multi-Objective Optimization. NeurIPS 2018 (the 40-task setup at 64×64).
    """
    shape = check_size(size)
    selection = select_celeba(path, attributes=attributes, limit=limit, check_counts=check_counts)
    index, rows = selection.index, selection.rows
    table = MultiLabelTable(
        inputs=read_image_folder(index.folder, selection.files, size=shape, mode="RGB"),
        targets={name: labels[rows] for name, labels in selection.labels.items()},
        tasks=selection.tasks,
        split=index.split[rows],
        source=f"celeba ({Path(path).expanduser()})",
    )
    if normalize:
        table.preprocessors = {"": ChannelNormalizer()}
    return table
