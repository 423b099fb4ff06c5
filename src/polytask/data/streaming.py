"""Data bigger than memory: image and audio folders streamed through a ``DataLoader``.

The in-memory path (``image-folder``, ``audio-folder`` + ``BatchLoader``) reads every file once
and keeps the split tensors; this module reads the files of each batch when it is drawn, in
``workers`` worker processes, so memory does not grow with the folder.

* ``ImageFiles`` / ``AudioFiles``: a split of a folder as a map-style dataset; a batch is read
  in one ``__getitems__`` call (one worker reads a whole batch) and comes out as the library's
  ``Batch`` ``(inputs, {task: labels})``.
* ``StreamingBatches``: the ``BatchSource`` the Trainer draws from. Its order is the one of
  ``BatchLoader`` (``polytask.data.batches.epoch_order`` and ``rank_share``): it depends only on
  ``(seed, epoch)``, so a resumed run draws the batches an uninterrupted run draws, and under
  data parallelism each rank reads its own disjoint share of every global batch.
* ``stream_image_folder`` / ``stream_audio_folder``: the train/val/test splits of a folder,
  labels and split read from its labels CSV exactly as the in-memory datasets read them.

Normalisation statistics (per-channel mean and standard deviation, the waveform RMS) are fitted
on the training split in one streaming pass (``fit_channel_norm``, ``fit_waveform_scale``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from polytask.data.audio import WaveformScaler, fit_length, read_wav, resample
from polytask.data.batches import (
    Batch,
    batches_per_epoch,
    check_batching,
    epoch_order,
    rank_share,
    target_tensor,
)
from polytask.data.bundle import split_rows
from polytask.data.images import IMAGE_MODES, ChannelNormalizer, load_image
from polytask.data.sources.modalities import _folder_table
from polytask.errors import ConfigError, DataError
from polytask.tasks import TaskSpec


class FileSamples(Dataset[Batch], ABC):
    """The samples ``rows`` of a folder's ``files`` with their labels, read on demand.

    ``targets`` holds every row's labels (one tensor per task, indexed by row of the labels
    file); subclasses say how one file becomes an input array (``read``) and how a stacked batch
    is normalised (``finish``).
    """

    def __init__(
        self, folder: Path, files: Sequence[str], rows: np.ndarray, targets: dict[str, Tensor]
    ) -> None:
        self.folder = Path(folder)
        self.files = list(files)
        self.rows = np.asarray(rows, dtype=np.int64)
        self.targets = targets

    def __len__(self) -> int:
        return len(self.rows)

    @abstractmethod
    def read(self, path: Path) -> np.ndarray:
        """One file as a float32 array of ``sample_shape``."""

    @property
    @abstractmethod
    def sample_shape(self) -> tuple[int, ...]:
        """The shape of one sample's input."""

    def finish(self, x: Tensor) -> Tensor:
        """The stacked raw inputs ``[B, ...]`` → model inputs (normalisation)."""
        return x

    def __getitem__(self, index: int) -> Batch:
        return self.__getitems__([index])

    def __getitems__(self, indices: Sequence[int]) -> Batch:
        """The batch of the samples at ``indices`` (positions in this split)."""
        return self.read_batch(indices)

    def read_batch(self, indices: Sequence[int]) -> tuple[Tensor, dict[str, Tensor]]:
        """The stacked, finished inputs ``[B, ...]`` and labels of the samples at ``indices``."""
        rows = self.rows[np.asarray(indices, dtype=np.int64)]
        x = np.empty((len(rows), *self.sample_shape), dtype=np.float32)
        for i, row in enumerate(rows):
            x[i] = self.read(self.folder / self.files[row])
        labels = torch.from_numpy(rows)
        return self.finish(torch.from_numpy(x)), {t: y[labels] for t, y in self.targets.items()}


class ImageFiles(FileSamples):
    """Images resized to ``size`` in ``mode`` (as ``polytask.data.images.load_image``), optionally
    normalised with a fitted ``ChannelNormalizer``."""

    def __init__(
        self,
        folder: Path,
        files: Sequence[str],
        rows: np.ndarray,
        targets: dict[str, Tensor],
        *,
        size: Sequence[int],
        mode: str = "L",
        normalizer: ChannelNormalizer | None = None,
    ) -> None:
        super().__init__(folder, files, rows, targets)
        if len(size) != 2 or min(int(s) for s in size) < 1:
            raise ConfigError(f"image-folder: size must be [height, width], found {list(size)}")
        if mode not in IMAGE_MODES:
            raise ConfigError(f"image-folder: mode must be one of {', '.join(IMAGE_MODES)}")
        self.size = (int(size[0]), int(size[1]))
        self.mode = mode
        self.normalizer = normalizer

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return (IMAGE_MODES[self.mode], *self.size)

    def read(self, path: Path) -> np.ndarray:
        return load_image(path, size=self.size, mode=self.mode)

    def finish(self, x: Tensor) -> Tensor:
        return x if self.normalizer is None else self.normalizer.transform(x)


class AudioFiles(FileSamples):
    """WAV files mixed to mono, resampled to ``sample_rate`` and cut or padded to ``length``
    samples, optionally divided by a fitted ``WaveformScaler``; inputs
    ``{"audio": [B, length]}``."""

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
        super().__init__(folder, files, rows, targets)
        if length < 1:
            raise ConfigError(f"audio-folder: the clip length must be positive, found {length}")
        self.sample_rate = int(sample_rate)
        self.length = int(length)
        self.scaler = scaler

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return (self.length,)

    def read(self, path: Path) -> np.ndarray:
        wave, rate = read_wav(path)
        return fit_length(resample(wave, rate, self.sample_rate), self.length)

    def __getitems__(self, indices: Sequence[int]) -> Batch:
        x, labels = self.read_batch(indices)
        return {"audio": x}, labels

    def finish(self, x: Tensor) -> Tensor:
        return x if self.scaler is None else self.scaler.transform(x.numpy())


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
    """Batches of a ``FileSamples`` read by a ``DataLoader`` (``BatchSource``).

    ``workers`` worker processes (0: read in this process) each prefetch ``prefetch`` batches;
    workers persist across epochs unless ``persistent`` is false (a one-pass source).
    ``pin_memory`` defaults to whether CUDA is available.
    Batches, their order and the DDP shares are those of ``BatchLoader`` over the same samples.
    """

    def __init__(
        self,
        dataset: FileSamples,
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
        )

    def set_epoch(self, epoch: int) -> None:
        self.sampler.epoch = epoch

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[Batch]:
        return iter(self.loader)


# ----------------------------------------------------------------------------- normalisation
def fit_channel_norm(dataset: ImageFiles, *, batch_size: int = 256, workers: int = 0) -> None:
    """Fit ``dataset.normalizer``: per-channel mean and standard deviation of its images, in
    one streaming pass (float64 sums; the statistics of ``ChannelNormalizer.fit``)."""
    dataset.normalizer = None
    total = torch.zeros(IMAGE_MODES[dataset.mode], dtype=torch.float64)
    squares = torch.zeros_like(total)
    count = 0
    one_pass = StreamingBatches(
        dataset, batch_size, workers=workers, pin_memory=False, persistent=False
    )
    for inputs, _ in one_pass:
        assert isinstance(inputs, Tensor)  # images are one tensor
        x = inputs.to(torch.float64)
        total += x.sum(dim=(0, 2, 3))
        squares += (x * x).sum(dim=(0, 2, 3))
        count += x.shape[0] * x.shape[2] * x.shape[3]
    if count == 0:
        raise DataError(f"{dataset.folder}: no training images to fit the normalisation on")
    mean = total / count
    std = (squares / count - mean * mean).clamp_min(0).sqrt()
    dataset.normalizer = ChannelNormalizer(
        mean.tolist(), torch.where(std > 1e-12, std, torch.ones_like(std)).tolist()
    )


def fit_waveform_scale(dataset: AudioFiles, *, batch_size: int = 256, workers: int = 0) -> None:
    """Fit ``dataset.scaler``: the RMS level of its non-silent clips, in one streaming pass
    (the statistic of ``WaveformScaler.fit``)."""
    dataset.scaler = None
    power, values = 0.0, 0
    one_pass = StreamingBatches(
        dataset, batch_size, workers=workers, pin_memory=False, persistent=False
    )
    for inputs, _ in one_pass:
        assert isinstance(inputs, dict)  # waveforms are the block "audio"
        x = inputs["audio"].to(torch.float64)
        heard = x[x.abs().amax(dim=1) > 0]
        power += float((heard * heard).sum())
        values += heard.numel()
    rms = (power / values) ** 0.5 if values else 1.0
    dataset.scaler = WaveformScaler(dataset.sample_rate, rms if rms > 1e-12 else 1.0)


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
) -> tuple[list[TaskSpec], dict[str, ImageFiles]]:
    """The tasks and the ``train``/``val``/``test`` ``ImageFiles`` of an ``image-folder`` (same
    parameters, same split); with ``normalize`` the channel statistics of the training images
    are fitted in one streaming pass and applied to every split."""
    folder, files, specs, targets, rows = _labelled_splits(
        path, tasks, labels=labels, file_column=file_column, split_column=split_column,
        val_fraction=val_fraction, test_fraction=test_fraction, seed=seed,
    )  # fmt: skip
    splits = {
        name: ImageFiles(folder, files, part, targets, size=size, mode=mode)
        for name, part in rows.items()
    }
    if normalize:
        fit_channel_norm(splits["train"], workers=workers)
        for split in splits.values():
            split.normalizer = splits["train"].normalizer
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
    fit_waveform_scale(splits["train"], workers=workers)
    for split in splits.values():
        split.scaler = splits["train"].scaler
    return specs, splits
