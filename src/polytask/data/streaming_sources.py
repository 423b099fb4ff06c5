"""The datasets a run can stream (``data.streaming``), as a ``DataBundle`` of streamed splits.

``stream_bundle`` is the streamed counterpart of ``dataset_tables`` + ``build_bundle``: the same
tasks, split rows, preprocessing (kind and fitted statistics), target scales, input shape and
data fingerprint as the in-memory path, but the splits are ``StreamedSplit``s that read their
rows when a batch is drawn:

* ``image-folder``, ``audio-folder``: the files of a labels CSV (``ImageFiles``, ``AudioFiles``);
* ``celeba``: the official image folder's files (``ImageFiles``), labels from its attribute file;
* ``nyuv2``, ``cityscapes``: one ``.npy`` file per scene and array, memory-mapped when read
  (``DenseScenes``); the label maps are read with the images, never held;
* ``file``: a CSV or Parquet file read once in chunks (CSV) or record batches (Parquet) into a
  memory-mapped float32 copy of its feature columns (``TableRows``); labels and the split stay
  in memory (a few numbers per row). Categorical columns need the in-memory path.

Input statistics are fitted on the training split in one streaming pass (``fit_on_train``),
for a CSV/Parquet file over its copy once written; a dense layout's depth target scale reads the
training depth maps once more, a few at a time.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from polytask.data.batches import target_tensor
from polytask.data.bundle import DataBundle, _with_target_scale, split_indices
from polytask.data.files import (
    _check_unique_columns,
    _column_names,
    file_fingerprint,
    file_format,
    table_from_frame,
    tasks_from_dicts,
)
from polytask.data.images import ChannelNormalizer
from polytask.data.preprocess import Inputs, Preprocessor, Standardizer, input_spec
from polytask.data.sources.celeba import check_size, select_celeba
from polytask.data.sources.common import check_fraction
from polytask.data.sources.dense_folders import (
    CHANNELS,
    DenseLayout,
    array_kind,
    check_layout,
    cityscapes_layout,
    layout_files,
    layout_split,
    nyuv2_layout,
    read_array,
)
from polytask.data.streaming import (
    ImageFiles,
    StreamedSplit,
    fit_on_train,
    stream_audio_folder,
    stream_image_folder,
)
from polytask.data.table import SPLITS
from polytask.errors import ConfigError, DataError, unknown_name
from polytask.tasks import TaskSpec


@dataclass
class StreamedSource:
    """What a streamable dataset gives ``stream_bundle``: its tasks, its three splits (input
    preprocessing already fitted), the fingerprint a run records, and its feature names."""

    tasks: list[TaskSpec]
    splits: dict[str, StreamedSplit]
    fingerprint: dict[str, Any] | None  # None: the name, parameters and seed (``load_dataset``)
    source: str
    feature_names: list[str] | None = None


@dataclass(frozen=True)
class StreamOptions:
    """The run's settings a streamed source needs besides the dataset's own parameters."""

    seed: int = 0
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    standardize: bool = True  # standardise numeric inputs (``data.standardize``)
    workers: int = 0  # processes reading the one-pass statistics
    cache_dir: str | None = None  # where a CSV/Parquet file's feature copy is written
    chunk_rows: int = 50_000  # rows of a CSV/Parquet file converted at a time


StreamedBuilder = Callable[..., StreamedSource]

#: how each streamable dataset is read: ``builder(options, **params)`` with the dataset's own
#: parameters (those of its in-memory builder in ``DATASETS``)
STREAMED_SOURCES: dict[str, StreamedBuilder] = {}


def _streamed(name: str) -> Callable[[StreamedBuilder], StreamedBuilder]:
    def register(builder: StreamedBuilder) -> StreamedBuilder:
        STREAMED_SOURCES[name] = builder
        return builder

    return register


def stream_bundle(
    name: str,
    params: Mapping[str, Any],
    options: StreamOptions,
    *,
    tasks: Sequence[str] | None = None,
) -> DataBundle:
    """The ``DataBundle`` of dataset ``name`` with streamed splits: what ``build_bundle`` makes
    of the same dataset in memory, except that no split's inputs are ever one tensor.
    ``tasks`` keeps only those tasks. ``ConfigError`` when ``name`` cannot be streamed."""
    builder = STREAMED_SOURCES.get(name)
    if builder is None:
        raise ConfigError(
            f"data.streaming: dataset {name!r} cannot be streamed (it is generated or read in "
            f"memory); streamable: {', '.join(sorted(STREAMED_SOURCES))}; set data.streaming: "
            "null to load it in memory"
        )
    data = builder(options, **params)
    specs = data.tasks
    if tasks is not None:
        known = [s.name for s in specs]
        unknown = [t for t in tasks if t not in known]
        if unknown:
            raise ConfigError(f"data.tasks: {unknown_name('task', unknown, known)}")
        specs = [s for s in specs if s.name in tasks]
        data.splits = {k: v.select_tasks(list(tasks)) for k, v in data.splits.items()}
    if data.fingerprint is None:
        data.fingerprint = {"dataset": name, "params": dict(params), "seed": options.seed}
    train, val, test = (data.splits[s] for s in SPLITS)
    sizes = {s: len(data.splits[s]) for s in SPLITS}
    first, _ = train.__getitems__([0])
    info = {
        "source": data.source,
        "sizes": sizes,
        "streaming": True,
        "datasets": [
            {
                "name": name,
                "source": data.source,
                "tasks": [t.name for t in specs],
                "sizes": sizes,
                "train_rows": [0, sizes["train"]],
                "fingerprint": data.fingerprint,
            }
        ],
    }
    return DataBundle(
        tasks=[_with_target_scale(t, _train_labels(train, t.name)) for t in specs],
        train=train,
        val=val,
        test=test,
        input_shape=input_spec(first, train.preprocessors),
        feature_names=data.feature_names,
        preprocessors=train.preprocessors,
        info=info,
    )


# ----------------------------------------------------------------------------- folders
@_streamed("image-folder")
def _image_folder(
    options: StreamOptions, *, path: str, tasks: list[dict[str, Any]],
    labels: str = "labels.csv", **params: Any,
) -> StreamedSource:  # fmt: skip
    specs, splits = stream_image_folder(
        path, tasks, labels=labels, seed=options.seed, standardize=options.standardize,
        val_fraction=options.val_fraction, test_fraction=options.test_fraction,
        workers=options.workers, **params,
    )  # fmt: skip
    fingerprint = file_fingerprint(Path(path) / labels)  # the labels file, as in memory
    return StreamedSource(specs, dict(splits), fingerprint, str(Path(path)))


@_streamed("audio-folder")
def _audio_folder(
    options: StreamOptions, *, path: str, tasks: list[dict[str, Any]],
    labels: str = "labels.csv", seconds: float | None = None, **params: Any,
) -> StreamedSource:  # fmt: skip
    if seconds is None:
        raise ConfigError(
            "data.params.seconds: a streamed audio-folder needs the clip length (in memory it "
            "defaults to the longest file, which would mean reading every file first)"
        )
    specs, splits = stream_audio_folder(
        path, tasks, seconds=seconds, labels=labels, seed=options.seed,
        val_fraction=options.val_fraction, test_fraction=options.test_fraction,
        workers=options.workers, **params,
    )  # fmt: skip
    fingerprint = file_fingerprint(Path(path) / labels)
    return StreamedSource(specs, dict(splits), fingerprint, str(Path(path)))


@_streamed("celeba")
def _celeba(
    options: StreamOptions, *, path: str, size: Sequence[int] = (64, 64),
    attributes: list[str] | None = None, limit: int | float | None = None,
    normalize: bool = True, check_counts: bool = True,
) -> StreamedSource:  # fmt: skip
    """CelebA as ``celeba`` reads it in memory (the same rows, tasks, labels, official split and
    channel statistics), each batch's images decoded when it is drawn."""
    shape = check_size(size)
    chosen = select_celeba(path, attributes=attributes, limit=limit, check_counts=check_counts)
    index = chosen.index
    targets = {t.name: target_tensor(t, chosen.labels[t.name]) for t in chosen.tasks}
    split = index.split[chosen.rows]
    splits: dict[str, StreamedSplit] = {
        name: ImageFiles(index.folder, index.files, chosen.rows[split == code], targets,
                         size=shape, mode="RGB")
        for code, name in enumerate(SPLITS)
    }  # fmt: skip
    if normalize or options.standardize:
        chosen_norm = ChannelNormalizer() if normalize else Standardizer()
        fit_on_train(splits, {"": chosen_norm}, workers=options.workers)
    return StreamedSource(chosen.tasks, splits, None, f"celeba ({Path(path).expanduser()})")


# ----------------------------------------------------------------------------- dense folders
class DenseScenes(StreamedSplit):
    """Scenes of a dense ``.npy`` layout: per row, the image file and each task's label file,
    memory-mapped and copied into the batch when it is read (channels first, as in memory)."""

    def __init__(
        self,
        layout: DenseLayout,
        files: dict[str, list[Path]],
        rows: np.ndarray,
        tasks: Sequence[TaskSpec],
        preprocessors: dict[str, Preprocessor] | None = None,
    ) -> None:
        super().__init__(rows, {}, preprocessors)
        self.layout, self.files, self.tasks = layout, files, list(tasks)

    def select_tasks(self, names: Sequence[str]) -> DenseScenes:
        chosen = super().select_tasks(names)
        assert isinstance(chosen, DenseScenes)
        chosen.tasks = [t for t in self.tasks if t.name in names]
        return chosen

    def _read(self, key: str, kind: str, rows: np.ndarray, dtype: torch.dtype) -> Tensor:
        """The arrays ``key`` of the scenes ``rows``, channels first, copied from their mapped
        files into one tensor (memory torch allocates, as an in-memory batch's: NumPy's
        alignment can make a kernel round differently). Class maps: negative = ignored."""
        channels = CHANNELS[kind]
        shape = self.layout.shape if channels is None else (channels, *self.layout.shape)
        out = torch.empty((len(rows), *shape), dtype=dtype)
        filled = out.numpy()
        for i, row in enumerate(rows):
            array = read_array(self.files[key][row], kind, self.layout.shape, mmap=True)
            filled[i] = np.where(array < 0, -1, array) if dtype == torch.int64 else array
        return out

    def read_rows(self, rows: np.ndarray) -> tuple[Inputs, dict[str, Tensor]]:
        return self._read("image", "image", rows, torch.float32), self.read_labels(rows)

    def read_labels(self, rows: np.ndarray) -> dict[str, Tensor]:
        """Each task's label maps of the scenes ``rows`` (as ``nyuv2``/``cityscapes`` encode
        them in memory); ``DataError`` naming a file with a class out of range."""
        labels: dict[str, Tensor] = {}
        for task in self.tasks:
            classes = task.kind == "segmentation"
            y = self._read(
                task.name, array_kind(task), rows, torch.int64 if classes else torch.float32
            )
            if classes:
                bad = torch.nonzero(y.reshape(len(y), -1).amax(dim=1) >= task.num_classes)
                if len(bad):
                    where = self.files[task.name][rows[int(bad[0])]]
                    raise DataError(f"{where}: class above {task.num_classes - 1}")
            labels[task.name] = y
        return labels


class _LabelsOnRead:
    """One task's training label maps, read when sliced: what the target scale of a dense task
    (``bundle._with_target_scale``) reads, a few rows at a time, without holding the split."""

    def __init__(self, split: DenseScenes, task: str) -> None:
        self.split, self.task = split, task

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: slice) -> Tensor:
        rows = self.split.rows[np.arange(len(self.split))[index]]
        return self.split.read_labels(rows)[self.task]


def _train_labels(train: StreamedSplit, task: str) -> Tensor:
    """``train``'s labels of ``task``: in memory, or read from their files when sliced."""
    if task in train.targets:
        return train.targets[task]
    assert isinstance(train, DenseScenes)
    return cast(Tensor, _LabelsOnRead(train, task))  # read in slices, never stacked whole


def _dense_source(
    path: str, layout: DenseLayout, options: StreamOptions, *, check_counts: bool,
    val_fraction: float,
) -> StreamedSource:  # fmt: skip
    """The streamed splits of a dense layout: the ``train`` folder (a seeded ``val_fraction``
    held out) and the ``val`` folder as test, checked as the in-memory loader checks them
    (folders, file names and counts up front; each file's shape when it is read)."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DataError(f"{layout.name}: {root} is not a folder")
    check_fraction("val_fraction", val_fraction)
    keys = ["image", *(t.name for t in layout.tasks)]
    check_layout(root, layout.name, layout.folders, keys)
    files: dict[str, list[Path]] = {key: [] for key in keys}
    counts: dict[str, int] = {}
    for part in ("train", "val"):
        expected = layout.counts[part] if check_counts else None
        for key in keys:
            found = layout_files(root, part, layout.folders[key], expected)
            if key != "image" and len(found) != counts[part]:
                raise DataError(
                    f"{root / part / layout.folders[key]}: {len(found)} files for "
                    f"{counts[part]} images"
                )
            counts.setdefault(part, len(found))
            files[key] += found
    split = layout_split(
        counts["train"], counts["val"], val_fraction=val_fraction, seed=options.seed
    )
    splits: dict[str, StreamedSplit] = {
        name: DenseScenes(layout, files, np.flatnonzero(split == code), layout.tasks)
        for code, name in enumerate(SPLITS)
    }
    if options.standardize:
        fit_on_train(splits, {"": Standardizer()}, workers=options.workers)
    return StreamedSource(list(layout.tasks), splits, None, f"{layout.name} ({root})")


@_streamed("nyuv2")
def _nyuv2(
    options: StreamOptions, *, path: str, check_counts: bool = True, val_fraction: float = 0.1
) -> StreamedSource:
    return _dense_source(
        path, nyuv2_layout(), options, check_counts=check_counts, val_fraction=val_fraction
    )


@_streamed("cityscapes")
def _cityscapes(
    options: StreamOptions, *, path: str, classes: int = 7, check_counts: bool = True,
    val_fraction: float = 0.1,
) -> StreamedSource:  # fmt: skip
    layout = cityscapes_layout(classes)
    return _dense_source(
        path, layout, options, check_counts=check_counts, val_fraction=val_fraction
    )


# ----------------------------------------------------------------------------- CSV / Parquet
class MappedArray:
    """A float32 ``[rows, columns]`` array in a file, memory-mapped by each process that reads
    it (DataLoader workers included: only the path travels, never the pages). The folder it was
    written in is removed when the array is garbage-collected in the process that made it."""

    def __init__(self, path: Path, shape: tuple[int, int], *, owned_folder: Path | None) -> None:
        self.path, self.shape = Path(path), shape
        self._array: np.ndarray | None = None
        if owned_folder is not None:
            creator = os.getpid()
            weakref.finalize(self, _remove_folder, owned_folder, creator)

    @property
    def array(self) -> np.ndarray:
        if self._array is None:
            self._array = np.memmap(self.path, dtype=np.float32, mode="r", shape=self.shape)
        return self._array

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_array": None}


def _remove_folder(folder: Path, creator: int) -> None:
    if os.getpid() == creator:  # a forked worker exiting never removes its parent's file
        shutil.rmtree(folder, ignore_errors=True)


class TableRows(StreamedSplit):
    """Rows of a table's feature matrix kept in a ``MappedArray``; labels in memory."""

    def __init__(
        self,
        features: MappedArray,
        rows: np.ndarray,
        targets: dict[str, Tensor],
        preprocessors: dict[str, Preprocessor] | None = None,
    ) -> None:
        super().__init__(rows, targets, preprocessors)
        self.features = features

    def read_rows(self, rows: np.ndarray) -> tuple[Inputs, dict[str, Tensor]]:
        x = torch.empty((len(rows), self.features.shape[1]))  # torch's alignment, as in memory
        np.take(self.features.array, rows, axis=0, out=x.numpy())
        return x, {}


def _frames(path: Path, chunk_rows: int) -> Iterator[pd.DataFrame]:
    """The file's rows as data frames of at most ``chunk_rows`` rows (CSV chunks, Parquet record
    batches); ``DataError`` naming the file when it cannot be read."""
    kind = file_format(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        _check_unique_columns(path, _column_names(path, kind))
        if kind == "csv":
            with pd.read_csv(path, chunksize=chunk_rows) as chunks:
                yield from chunks
        else:
            import pyarrow.parquet as pq

            for batch in pq.ParquetFile(path).iter_batches(batch_size=chunk_rows):
                yield batch.to_pandas()
    except ImportError as exc:
        raise DataError(f"{path}: reading {kind} files needs pyarrow: {exc}") from exc
    except (OSError, ValueError) as exc:  # parser, encoding, empty-file and Arrow errors
        raise DataError(f"{path}: cannot read it as {kind}: {exc}") from exc


@dataclass
class _Converted:
    features: MappedArray
    feature_names: list[str]
    targets: dict[str, np.ndarray]
    split: np.ndarray | None


def _convert(
    path: Path,
    specs: list[TaskSpec],
    columns: dict[str, list[str]],
    *,
    features: list[str] | None,
    split_column: str | None,
    cache_dir: str | None,
    chunk_rows: int,
) -> _Converted:
    """One pass over the file: each chunk checked as ``table_from_frame`` checks a whole file
    (a problem names the data row counted from the file's start), its features appended to a
    float32 file, its labels and split codes kept."""
    if cache_dir is not None:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="polytask-stream-", dir=cache_dir))
    try:
        names: list[str] | None = None
        labels: dict[str, list[np.ndarray]] = {t.name: [] for t in specs}
        splits: list[np.ndarray] = []
        start = 0
        with (folder / "features.f32").open("wb") as out:
            for frame in _frames(path, chunk_rows):
                table = _checked_chunk(frame, path, specs, columns, features, split_column, start)
                names = names or table.feature_names
                out.write(np.ascontiguousarray(table.inputs, dtype=np.float32).tobytes())
                for name, y in table.targets.items():
                    labels[name].append(y)
                if table.split is not None:
                    splits.append(table.split)
                start += len(frame)
        if start == 0 or names is None:
            raise DataError(f"{path}: no data rows")
        mapped = MappedArray(folder / "features.f32", (start, len(names)), owned_folder=folder)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return _Converted(
        mapped,
        names,
        {n: np.concatenate(parts) for n, parts in labels.items()},
        np.concatenate(splits) if splits else None,
    )


def _checked_chunk(
    frame: pd.DataFrame,
    path: Path,
    specs: list[TaskSpec],
    columns: dict[str, list[str]],
    features: list[str] | None,
    split_column: str | None,
    start: int,
) -> Any:
    """``table_from_frame`` of one chunk; its error names the data row counted from the file's
    first data row, not the chunk's."""
    try:
        return table_from_frame(
            frame, tasks=specs, label_columns=columns, feature_columns=features,
            source=str(path), split_column=split_column,
        )  # fmt: skip
    except DataError as exc:
        message = re.sub(r"data row (\d+)", lambda m: f"data row {int(m[1]) + start}", str(exc))
        raise DataError(message) from None


@_streamed("file")
def _file(
    options: StreamOptions, *, path: str, tasks: list[dict[str, Any]],
    features: list[str] | None = None, categorical: list[str] | None = None,
    split_column: str | None = None,
) -> StreamedSource:  # fmt: skip
    if categorical:
        raise ConfigError(
            "data.params.categorical: a streamed file reads numeric feature columns only; "
            "set data.streaming: null to embed categorical columns"
        )
    specs, columns = tasks_from_dicts(tasks, source=path)
    converted = _convert(
        Path(path), specs, columns, features=features, split_column=split_column,
        cache_dir=options.cache_dir, chunk_rows=options.chunk_rows,
    )  # fmt: skip
    n = converted.features.shape[0]
    if converted.split is not None:
        rows = {name: np.flatnonzero(converted.split == code) for code, name in enumerate(SPLITS)}
    else:
        rows = split_indices(
            n, val_fraction=options.val_fraction, test_fraction=options.test_fraction,
            seed=options.seed,
        )  # fmt: skip
    if len(rows["train"]) == 0:
        raise DataError(f"{path}: the training split is empty")
    targets = {t.name: target_tensor(t, converted.targets[t.name]) for t in specs}
    splits: dict[str, StreamedSplit] = {
        name: TableRows(converted.features, part, targets) for name, part in rows.items()
    }
    if options.standardize:
        fit_on_train(splits, {"": Standardizer()}, workers=options.workers)
    fingerprint = file_fingerprint(Path(path))
    return StreamedSource(specs, splits, fingerprint, path, converted.feature_names)
