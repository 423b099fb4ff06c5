"""Data bigger than memory: splits read batch by batch through a ``DataLoader``.

The in-memory path (a ``MultiLabelDataset`` + ``BatchLoader``) reads the whole dataset once and
keeps the split tensors; this module reads the rows of each batch when it is drawn, in
``workers`` worker processes, so memory does not grow with the data.

* ``StreamedSplit``: a split whose inputs are read on demand (subclasses say how:
  ``read_rows``); a batch is read in one ``__getitems__`` call (one worker reads a whole
  batch), preprocessed, and comes out as the library's ``Batch`` ``(inputs, {task: labels})``.
  ``ImageFiles`` / ``AudioFiles`` read a folder's files; ``polytask.data.streaming_sources``
  adds dense ``.npy`` scenes and CSV/Parquet rows.
* ``StreamingBatches``: the ``BatchSource`` the Trainer draws from. Its order is the one of
  ``BatchLoader`` (``polytask.data.batches.epoch_order`` and ``rank_share``): it depends only on
  ``(seed, epoch)``, so a resumed run draws the batches an uninterrupted run draws, and under
  data parallelism each rank reads its own disjoint share of every global batch. Drawing
  batches does not touch torch's global random generator, so a streamed run's initialisation
  and dropout are the in-memory run's.
* ``stream_image_folder`` / ``stream_audio_folder``: the train/val/test splits of a folder,
  labels and split read from its labels CSV exactly as the in-memory datasets read them.

Input statistics (per-channel or per-feature mean and standard deviation, the waveform RMS) are
fitted on the training split in one streaming pass (``fit_streamed``, ``fit_on_train``).
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import track
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from polytask.data.audio import WaveformScaler, fit_length, read_wav, resample
from polytask.data.batches import (
    Batch,
    MultiLabelDataset,
    batches_per_epoch,
    check_batching,
    epoch_order,
    rank_share,
    target_tensor,
)
from polytask.data.bundle import apply_preprocessors, split_rows
from polytask.data.images import IMAGE_MODES, ChannelNormalizer, load_image
from polytask.data.preprocess import Inputs, Preprocessor, Standardizer
from polytask.data.sources.modalities import _folder_table
from polytask.errors import ConfigError, DataError
from polytask.tasks import TaskSpec


class StreamedSplit(MultiLabelDataset, ABC):
    """A split whose inputs are read when a batch is drawn, not held in memory.

    ``rows`` are the split's rows of its source; ``targets`` the labels held in memory (one
    tensor per task with an entry per row of the source, of which the split keeps its rows');
    labels stored next to the inputs (dense label maps) come from ``read_rows``.
    ``preprocessors`` (by input block, ``""`` for a tensor input, as
    ``DataBundle.preprocessors``) are applied to every batch. It is a ``MultiLabelDataset``
    whose ``take`` reads the rows, so every consumer of a split (``BatchLoader``, the inference
    loop) can read it; only ``inputs``, the whole input tensor, does not exist.
    """

    def __init__(
        self,
        rows: np.ndarray,
        targets: dict[str, Tensor],
        preprocessors: dict[str, Preprocessor] | None = None,
    ) -> None:
        self.rows = np.asarray(rows, dtype=np.int64)
        index = torch.from_numpy(self.rows)
        self.targets = {t: y[index] for t, y in targets.items()}
        self.preprocessors = dict(preprocessors or {})

    @property  # type: ignore[override]
    def inputs(self) -> Inputs:
        raise DataError(
            "this split is streamed (data.streaming): its inputs are read batch by batch and "
            "are never one tensor in memory; use data.streaming: null for this feature"
        )

    @inputs.setter
    def inputs(self, value: Inputs) -> None:
        raise DataError("a streamed split's inputs are read from its files")

    def __len__(self) -> int:
        return len(self.rows)

    @abstractmethod
    def read_rows(self, rows: np.ndarray) -> tuple[Inputs, dict[str, Tensor]]:
        """The raw (not preprocessed) inputs of the source's ``rows`` and the labels read
        with them (none when every label is in ``targets``)."""

    def __getitem__(self, index: int) -> Batch:
        return self.__getitems__([index])

    def __getitems__(self, indices: Sequence[int]) -> Batch:
        """The preprocessed batch of the samples at ``indices`` (positions in this split)."""
        positions = np.asarray(indices, dtype=np.int64)
        raw, read = self.read_rows(self.rows[positions])
        at = torch.from_numpy(positions)
        labels = {t: y[at] for t, y in self.targets.items()}
        labels.update(read)
        return apply_preprocessors(raw, self.preprocessors), labels

    def take(self, index: Tensor) -> Batch:
        """The batch of the positions ``index`` (``MultiLabelDataset.take``), read now."""
        return self.__getitems__(index.reshape(-1).tolist())

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def to(self, device: torch.device | str) -> MultiLabelDataset:
        if torch.device(device).type == "cpu":
            return self
        raise ConfigError(
            "data.on_device: a streamed split cannot live on the device; batches are moved "
            "one at a time (set data.on_device: false with data.streaming)"
        )

    def select_tasks(self, names: Sequence[str]) -> StreamedSplit:
        """The same samples with only the labels of ``names``."""
        chosen = copy.copy(self)
        chosen.targets = {n: y for n, y in self.targets.items() if n in names}
        return chosen


class FileSamples(StreamedSplit):
    """The samples ``rows`` of a folder's ``files`` (one file per row) with their labels.

    ``targets`` holds every row's labels of the labels file (indexed by row); subclasses say
    how one file becomes an input array (``read``) and which shape it has.
    """

    def __init__(
        self,
        folder: Path,
        files: Sequence[str],
        rows: np.ndarray,
        targets: dict[str, Tensor],
        preprocessors: dict[str, Preprocessor] | None = None,
    ) -> None:
        super().__init__(rows, targets, preprocessors)
        self.folder = Path(folder)
        self.files = list(files)

    @abstractmethod
    def read(self, path: Path) -> np.ndarray:
        """One file as a float32 array of ``sample_shape``."""

    @property
    @abstractmethod
    def sample_shape(self) -> tuple[int, ...]:
        """The shape of one sample's input."""

    def read_files(self, rows: np.ndarray) -> Tensor:
        """The stacked raw inputs ``[B, *sample_shape]`` of the files of ``rows``."""
        # memory torch allocates, as an in-memory batch's: NumPy's alignment can make a kernel
        # round differently
        x = torch.empty((len(rows), *self.sample_shape))
        filled = x.numpy()
        for i, row in enumerate(rows):
            filled[i] = self.read(self.folder / self.files[row])
        return x

    def read_rows(self, rows: np.ndarray) -> tuple[Inputs, dict[str, Tensor]]:
        return self.read_files(rows), {}


class ImageFiles(FileSamples):
    """Images resized to ``size`` in ``mode`` (as ``polytask.data.images.load_image``); the
    input block ``""`` is normalised by ``normalizer`` when one is set."""

    def __init__(
        self,
        folder: Path,
        files: Sequence[str],
        rows: np.ndarray,
        targets: dict[str, Tensor],
        *,
        size: Sequence[int],
        mode: str = "L",
        normalizer: Preprocessor | None = None,
    ) -> None:
        super().__init__(folder, files, rows, targets, {"": normalizer} if normalizer else None)
        if len(size) != 2 or min(int(s) for s in size) < 1:
            raise ConfigError(f"image-folder: size must be [height, width], found {list(size)}")
        if mode not in IMAGE_MODES:
            raise ConfigError(f"image-folder: mode must be one of {', '.join(IMAGE_MODES)}")
        self.size = (int(size[0]), int(size[1]))
        self.mode = mode

    @property
    def normalizer(self) -> Preprocessor | None:
        """The images' fitted normalisation (``channel_norm`` or per-pixel ``standardize``)."""
        return self.preprocessors.get("")

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return (IMAGE_MODES[self.mode], *self.size)

    def read(self, path: Path) -> np.ndarray:
        return load_image(path, size=self.size, mode=self.mode)


class AudioFiles(FileSamples):
    """WAV files mixed to mono, resampled to ``sample_rate`` and cut or padded to ``length``
    samples; inputs ``{"audio": [B, length]}``, divided by ``scaler`` when one is set."""

    def __init__(
        self,
        folder: Path,
        files: Sequence[str],
        rows: np.ndarray,
        targets: dict[str, Tensor],
        *,
        sample_rate: int,
        length: int,
        scaler: WaveformScaler | None = None,
    ) -> None:
        super().__init__(folder, files, rows, targets, {"audio": scaler} if scaler else None)
        if length < 1:
            raise ConfigError(f"audio-folder: the clip length must be positive, found {length}")
        self.sample_rate = int(sample_rate)
        self.length = int(length)

    @property
    def scaler(self) -> Preprocessor | None:
        """The fitted ``waveform`` scale."""
        return self.preprocessors.get("audio")

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return (self.length,)

    def read(self, path: Path) -> np.ndarray:
        wave, rate = read_wav(path)
        return fit_length(resample(wave, rate, self.sample_rate), self.length)

    def read_rows(self, rows: np.ndarray) -> tuple[Inputs, dict[str, Tensor]]:
        return {"audio": self.read_files(rows)}, {}


#: glibc's ``mallopt`` parameter for the size above which ``malloc`` maps memory of its own
M_MMAP_THRESHOLD = -3


def return_freed_buffers(worker_id: int = 0) -> None:
    """A DataLoader worker's start (``worker_init_fn``): buffers of 1 MiB and more are mapped
    on their own and given back to the system when freed.

    glibc raises that threshold after the first large buffer is freed, and from then on serves
    large buffers from its heap; in a worker, which allocates and frees a batch's buffers
    (several MiB each) over and over, that heap kept growing, by ~16 MiB a batch of 256 64×64
    images (to 734 MiB over a 20,000-image pass); with the threshold fixed it stays flat
    (docs/streaming.md). Setting it also stops glibc's adjustment. Not glibc (macOS, musl):
    nothing to do."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, 1 << 20)
    except (OSError, AttributeError):
        return


def _keep_batch(batch: Any) -> Any:
    """The DataLoader's collate function: a dataset's ``__getitems__`` already made the batch."""
    return batch


class EpochBatchSampler(Sampler[list[int]]):
    """This rank's index lists of every batch of an epoch, in ``BatchLoader``'s order."""

    def __init__(
        self,
        n: int,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int,
        drop_last: bool,
        rank: int,
        world_size: int,
    ) -> None:
        check_batching(batch_size, rank, world_size)
        self.n, self.batch_size, self.shuffle, self.seed = n, batch_size, shuffle, seed
        self.drop_last, self.rank, self.world_size = drop_last, rank, world_size
        self.epoch = 0

    def __len__(self) -> int:
        return batches_per_epoch(self.n, self.batch_size, self.world_size, self.drop_last)

    def __iter__(self) -> Iterator[list[int]]:
        order = epoch_order(self.n, shuffle=self.shuffle, seed=self.seed, epoch=self.epoch)
        size = self.batch_size * self.world_size
        for i in range(len(self)):
            yield rank_share(order[i * size : (i + 1) * size], self.rank, self.world_size).tolist()


class StreamingBatches:
    """Batches of a ``StreamedSplit`` read by a ``DataLoader`` (``BatchSource``).

    ``workers`` worker processes (0: read in this process) each prefetch ``prefetch`` batches;
    workers persist across epochs unless ``persistent`` is false (a one-pass source).
    ``pin_memory`` defaults to whether CUDA is available.
    Batches, their order and the DDP shares are those of ``BatchLoader`` over the same samples.
    """

    def __init__(
        self,
        dataset: StreamedSplit,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        workers: int = 0,
        prefetch: int = 2,
        pin_memory: bool | None = None,
        persistent: bool = True,
    ) -> None:
        if workers < 0 or prefetch < 1:
            raise ConfigError(
                f"streaming: workers must be >= 0 and prefetch >= 1, found workers={workers}, "
                f"prefetch={prefetch}"
            )
        self.dataset = dataset
        self.sampler = EpochBatchSampler(
            len(dataset),
            batch_size,
            shuffle=shuffle,
            seed=seed,
            drop_last=drop_last,
            rank=rank,
            world_size=world_size,
        )
        pin = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.loader: DataLoader[Batch] = DataLoader(
            dataset,
            batch_sampler=self.sampler,
            num_workers=workers,
            collate_fn=_keep_batch,
            pin_memory=pin,
            persistent_workers=persistent and workers > 0,
            prefetch_factor=prefetch if workers > 0 else None,
            # the workers' base seed comes from here, not from torch's global generator: drawing
            # batches leaves the run's random stream (initialisation, dropout) as in memory
            generator=torch.Generator().manual_seed(seed),
            worker_init_fn=return_freed_buffers,
        )

    def set_epoch(self, epoch: int) -> None:
        self.sampler.epoch = epoch

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[Batch]:
        return iter(self.loader)


# ----------------------------------------------------------------------------- normalisation
class _Moments:
    """Mean and variance over ``dims`` of batches, merged batch by batch with Chan et al.'s
    pairwise update (float64; no ``E[x²] - mean²`` cancellation when the mean is large)."""

    def __init__(self, dims: tuple[int, ...]) -> None:
        self.dims = dims
        self.count = 0
        self.mean: Tensor | None = None
        self.m2: Tensor | None = None

    def add(self, x: Tensor) -> None:
        """Take in the batch ``x``."""
        x = x.to(torch.float64)
        part = _Moments(self.dims)
        part.mean = x.mean(dim=self.dims, keepdim=True)
        part.m2 = ((x - part.mean) ** 2).sum(dim=self.dims, keepdim=True)
        part.count = x.numel() // part.mean.numel()
        self.merge(part)

    def merge(self, part: _Moments) -> None:
        """Take in the statistics of other batches."""
        if part.mean is None or part.m2 is None:
            return
        if self.mean is None or self.m2 is None:
            self.count, self.mean, self.m2 = part.count, part.mean, part.m2
            return
        total = self.count + part.count
        delta = part.mean - self.mean
        self.mean = self.mean + delta * (part.count / total)
        self.m2 = self.m2 + part.m2 + delta * delta * (self.count * part.count / total)
        self.count = total

    def mean_std(self) -> tuple[Tensor, Tensor]:
        """Mean and standard deviation (a constant stays 1, as ``Standardizer.fit``)."""
        assert self.mean is not None and self.m2 is not None
        std = (self.m2 / self.count).sqrt()
        return self.mean, torch.where(std > 1e-12, std, torch.ones_like(std))


class _RmsLevel:
    """The RMS level of the non-silent rows (``WaveformScaler.fit``'s statistic)."""

    def __init__(self) -> None:
        self.power, self.values = 0.0, 0

    def add(self, x: Tensor) -> None:
        """Take in the batch ``x``."""
        flat = x.to(torch.float64).reshape(len(x), -1)
        heard = flat[flat.abs().amax(dim=1) > 0]
        self.power += float((heard * heard).sum())
        self.values += heard.numel()

    def merge(self, part: _RmsLevel) -> None:
        """Take in the statistics of other batches."""
        self.power += part.power
        self.values += part.values


Statistic = _Moments | _RmsLevel


def _statistic(pre: Preprocessor) -> Statistic:
    if isinstance(pre, ChannelNormalizer):
        return _Moments((0, 2, 3))
    if isinstance(pre, Standardizer):
        return _Moments((0,))
    if isinstance(pre, WaveformScaler):
        return _RmsLevel()
    raise DataError(f"{pre.kind}: cannot be fitted on streamed data")


def _fitted(pre: Preprocessor, statistic: Statistic) -> Preprocessor:
    if isinstance(statistic, _RmsLevel):
        assert isinstance(pre, WaveformScaler)
        rms = (statistic.power / statistic.values) ** 0.5 if statistic.values else 1.0
        return WaveformScaler(pre.sample_rate, rms if rms > 1e-12 else 1.0)
    mean, std = statistic.mean_std()
    if isinstance(pre, ChannelNormalizer):
        return ChannelNormalizer(mean.flatten().tolist(), std.flatten().tolist())
    return Standardizer(mean[0].float(), std[0].float())


class _BatchStatistics(Dataset[dict[str, Statistic]]):
    """A split's raw batches reduced to their statistics where they are read: in a worker
    process, so the training process never holds a batch (nor its float64 copies) of the
    statistics pass."""

    def __init__(self, split: StreamedSplit, preprocessors: dict[str, Preprocessor]) -> None:
        self.split, self.preprocessors = split, preprocessors

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> dict[str, Statistic]:
        return self.__getitems__([index])

    def __getitems__(self, indices: Sequence[int]) -> dict[str, Statistic]:
        inputs, _ = self.split.__getitems__(indices)
        statistics = {key: _statistic(pre) for key, pre in self.preprocessors.items()}
        for key, statistic in statistics.items():
            statistic.add(inputs[key] if isinstance(inputs, dict) else inputs)
        return statistics


def fit_streamed(
    split: StreamedSplit,
    preprocessors: dict[str, Preprocessor],
    *,
    batch_size: int = 256,
    workers: int = 0,
) -> dict[str, Preprocessor]:
    """``preprocessors`` (by input block) fitted on ``split``'s raw inputs in one streaming
    pass, and set on ``split``: per-channel (``channel_norm``) or per-feature (``standardize``)
    mean and standard deviation, the waveform RMS level (``waveform``); the statistics of their
    in-memory ``fit``, to float64 rounding. ``workers`` processes read the batches and reduce
    each to its statistics; this process merges them in batch order."""
    if len(split) == 0:
        raise DataError("no training samples to fit the input preprocessing on")
    split.preprocessors = {}
    batches = EpochBatchSampler(
        len(split), batch_size, shuffle=False, seed=0, drop_last=False, rank=0, world_size=1
    )
    one_pass: DataLoader[dict[str, Statistic]] = DataLoader(
        _BatchStatistics(split, preprocessors),
        batch_sampler=batches,
        num_workers=workers,
        collate_fn=_keep_batch,
        generator=torch.Generator().manual_seed(0),  # leaves torch's global generator alone
        worker_init_fn=return_freed_buffers,
    )
    merged = {key: _statistic(pre) for key, pre in preprocessors.items()}
    for part in track(one_pass, description="fitting the input preprocessing", transient=True):
        for key, statistic in merged.items():
            statistic.merge(part[key])
    split.preprocessors = {k: _fitted(pre, merged[k]) for k, pre in preprocessors.items()}
    return split.preprocessors


def fit_on_train(
    splits: Mapping[str, StreamedSplit], preprocessors: dict[str, Preprocessor], *, workers: int
) -> None:
    """Fit ``preprocessors`` on ``splits["train"]`` (``fit_streamed``) and apply them to every
    split."""
    fitted = fit_streamed(splits["train"], preprocessors, workers=workers)
    for split in splits.values():
        split.preprocessors = fitted


# ----------------------------------------------------------------------------- folders
def _labelled_splits(
    path: str,
    tasks: list[dict[str, Any]],
    *,
    labels: str,
    file_column: str,
    split_column: str | None,
    val_fraction: float,
    test_fraction: float,
    seed: int,
) -> tuple[Path, list[str], list[TaskSpec], dict[str, Tensor], dict[str, np.ndarray]]:
    """A folder's files, tasks, label tensors and split rows, as the in-memory path makes them
    (``_folder_table`` then ``split_rows``)."""
    folder, files, table = _folder_table(path, labels, file_column, tasks, split_column)
    targets = {t.name: target_tensor(t, table.targets[t.name]) for t in table.tasks}
    rows = split_rows(table, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)
    if len(rows["train"]) == 0:
        raise DataError(f"{folder}: the training split is empty")
    return folder, files, list(table.tasks), targets, rows


def stream_image_folder(
    path: str,
    tasks: list[dict[str, Any]],
    *,
    labels: str = "labels.csv",
    file_column: str = "file",
    size: Sequence[int] = (32, 32),
    mode: str = "L",
    normalize: bool = True,
    split_column: str | None = None,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 0,
    workers: int = 0,
    standardize: bool = False,
) -> tuple[list[TaskSpec], dict[str, ImageFiles]]:
    """The tasks and the ``train``/``val``/``test`` ``ImageFiles`` of an ``image-folder`` (same
    parameters, same split); with ``normalize`` the channel statistics of the training images
    are fitted in one streaming pass and applied to every split. Without it, ``standardize``
    standardises each pixel instead (what ``data.standardize`` does to an in-memory folder
    read with ``normalize: false``)."""
    folder, files, specs, targets, rows = _labelled_splits(
        path, tasks, labels=labels, file_column=file_column, split_column=split_column,
        val_fraction=val_fraction, test_fraction=test_fraction, seed=seed,
    )  # fmt: skip
    splits = {
        name: ImageFiles(folder, files, part, targets, size=size, mode=mode)
        for name, part in rows.items()
    }
    if normalize or standardize:
        chosen = ChannelNormalizer() if normalize else Standardizer()
        fit_on_train(splits, {"": chosen}, workers=workers)
    return specs, splits


def stream_audio_folder(
    path: str,
    tasks: list[dict[str, Any]],
    *,
    seconds: float,
    labels: str = "labels.csv",
    file_column: str = "file",
    sample_rate: int = 16000,
    split_column: str | None = None,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 0,
    workers: int = 0,
) -> tuple[list[TaskSpec], dict[str, AudioFiles]]:
    """The tasks and the ``train``/``val``/``test`` ``AudioFiles`` of an ``audio-folder``, clips
    cut or padded to ``seconds`` (required: finding the longest file would read them all), the
    RMS scale fitted on the training clips in one streaming pass."""
    if not seconds > 0:
        raise ConfigError(f"audio-folder: seconds must be positive, found {seconds}")
    folder, files, specs, targets, rows = _labelled_splits(
        path, tasks, labels=labels, file_column=file_column, split_column=split_column,
        val_fraction=val_fraction, test_fraction=test_fraction, seed=seed,
    )  # fmt: skip
    length = round(seconds * sample_rate)
    splits = {
        name: AudioFiles(folder, files, part, targets, sample_rate=sample_rate, length=length)
        for name, part in rows.items()
    }
    fit_on_train(splits, {"audio": WaveformScaler(sample_rate)}, workers=workers)
    return specs, splits
