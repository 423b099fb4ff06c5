"""Several datasets, one model: the mixer that draws training batches from them, and epochs.

Each task (or group of tasks) may come with its own dataset, of its own size. A
``MultiTaskMixer`` draws training batches from a list of ``TaskDataset``s:

* a **sampler** (``polytask.data.samplers``, by name) gives each dataset a probability per
  epoch: ``proportional``, ``uniform``, ``temperature``, ``round_robin``, ``annealed``, ``fixed``;
* ``batch_mode="single"``: every batch comes from one dataset, drawn with those probabilities;
  ``batch_mode="mixed"``: every *sample* of a batch draws its dataset, so a batch mixes datasets
  (they must share one input layout);
* an **epoch** is ``"steps:N"`` batches, or as many batches as one pass over the ``"largest"``
  or ``"smallest"`` dataset, or over all of them (``"sum"``);
* within an epoch each dataset is read in shuffled passes: a dataset drawn more often than its
  size (oversampling of a small task) starts a fresh shuffle when a pass ends, so its samples
  are repeated evenly;
* labels of the tasks a dataset does not feed are missing (``-1`` for multiclass, ``NaN``
  otherwise, as in ``polytask.tasks``): those tasks' losses are exactly zero and gradient
  methods drop them for that step.

The draw of epoch ``e`` depends only on ``(seed, e)`` (and the datasets' sizes), so a run resumed
at an epoch boundary draws the same batches; ``state_dict`` also records how far into an epoch
the mixer got, so a resume in the middle of an epoch continues with the next batch. Under data
parallelism every process draws the same global batch of ``world_size · batch_size`` samples
and takes its own contiguous share, like ``BatchLoader``.

The datasets are usually the tables of one ``polytask.data.bundle.build_bundle`` call
(``mixer_from_bundle``).

Example:
    >>> import torch
    >>> from polytask.data.batches import MultiLabelDataset
    >>> from polytask.tasks import TaskSpec
    >>> big = MultiLabelDataset(torch.randn(1000, 4), {"a": torch.randn(1000)})
    >>> small = MultiLabelDataset(torch.randn(10, 4), {"b": torch.randint(0, 3, (10,))})
    >>> tasks = [TaskSpec("a", "regression"), TaskSpec("b", "multiclass", num_classes=3)]
    >>> mixer = MultiTaskMixer(
    ...     [TaskDataset("big", big), TaskDataset("small", small)], tasks, batch_size=32,
    ...     sampler="temperature", sampler_params={"temperature": 2.0}, epoch="largest")
    >>> mixer.probabilities().round(3).tolist(), len(mixer)
    ([0.909, 0.091], 32)
    >>> x, y = next(iter(mixer))
    >>> x.shape, sorted(y)
    (torch.Size([32, 4]), ['a', 'b'])
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from polytask.data.batches import Batch, BatchLoader, MultiLabelDataset, missing_labels
from polytask.data.bundle import DataBundle
from polytask.data.preprocess import Inputs, take_inputs
from polytask.data.samplers import Sampler, build_sampler
from polytask.errors import ConfigError, DataError
from polytask.tasks import TaskSpec

__all__ = [
    "BatchMode",
    "MultiTaskMixer",
    "TaskDataset",
    "epoch_steps",
    "evaluation_batches",
    "mixer_from_bundle",
    "parse_epoch",
    "train_parts",
]

BatchMode = Literal["single", "mixed"]
BATCH_MODES: tuple[str, ...] = ("single", "mixed")

# random streams of one epoch: which dataset each draw uses, and each dataset's shuffles
_ASSIGN_STREAM = 7_001
_ORDER_STREAM = 7_002


# ----------------------------------------------------------------------------------- epochs
_EPOCH = re.compile(r"^(?:steps:(\d+)|largest|smallest|sum)$")


def parse_epoch(spec: str) -> tuple[str, int | None]:
    """``"steps:N"`` → ``("steps", N)``; ``"largest" | "smallest" | "sum"`` → ``(spec, None)``.

    Raises ``ConfigError`` for anything else."""
    match = _EPOCH.match(str(spec).strip())
    if match is None or (match.group(1) is not None and int(match.group(1)) < 1):
        raise ConfigError(
            f"expected 'steps:N' (N >= 1), 'largest', 'smallest' or 'sum', found {spec!r}"
        )
    if match.group(1) is not None:
        return "steps", int(match.group(1))
    return str(spec).strip(), None


def epoch_steps(spec: str, sizes: Sequence[int], global_batch: int) -> int:
    """Batches in one epoch: ``N`` for ``steps:N``, else enough batches of ``global_batch``
    samples for one pass over the largest dataset, the smallest one, or all of them."""
    kind, steps = parse_epoch(spec)
    if steps is not None:
        return steps
    total = {"largest": max(sizes), "smallest": min(sizes), "sum": sum(sizes)}[kind]
    return max(1, -(-int(total) // global_batch))


# ----------------------------------------------------------------------------------- datasets
@dataclass
class TaskDataset:
    """One dataset of a multi-dataset run: its training samples and the tasks it feeds.

    Args:
        name: how logs and errors refer to it.
        data: its samples with a label tensor per task (``MultiLabelDataset``).
        tasks: the tasks it feeds (default: every label column of ``data``); the labels of other
            tasks are treated as missing.
    """

    name: str
    data: MultiLabelDataset
    tasks: Sequence[str] | None = None

    def __len__(self) -> int:
        return len(self.data)

    @property
    def task_names(self) -> list[str]:
        return list(self.tasks) if self.tasks is not None else list(self.data.targets)


def _fill_labels(
    datasets: Sequence[TaskDataset], tasks: Sequence[TaskSpec]
) -> list[dict[str, Tensor]]:
    """Per dataset, a label tensor for every task (missing where the dataset does not feed it)."""
    names = [t.name for t in tasks]
    for ds in datasets:
        for task in ds.task_names:
            if task not in ds.data.targets:
                raise DataError(f"dataset {ds.name!r}: no labels for its task {task!r}")
            if task not in names:
                raise DataError(
                    f"dataset {ds.name!r}: task {task!r} is not one of the model's tasks "
                    f"({', '.join(names)})"
                )
    fed = {t for ds in datasets for t in ds.task_names}
    unfed = [n for n in names if n not in fed]
    if unfed:
        raise DataError(f"task {unfed[0]!r} has no dataset: no dataset feeds it")
    templates = {t: ds.data.targets[t] for ds in datasets for t in ds.task_names}
    filled = []
    for ds in datasets:
        own = set(ds.task_names)
        filled.append(
            {
                t.name: ds.data.targets[t.name]
                if t.name in own
                else missing_labels(t, templates.get(t.name), len(ds))
                for t in tasks
            }
        )
    return filled


def _layout(inputs: Inputs) -> Any:
    """Per-sample shapes and dtypes of a tensor or a dict of tensors."""
    if isinstance(inputs, dict):
        return {k: (tuple(v.shape[1:]), v.dtype) for k, v in sorted(inputs.items())}
    return (tuple(inputs.shape[1:]), inputs.dtype)


def _assemble(pieces: Sequence[tuple[Tensor, Batch]], total: int) -> Batch:
    """One batch of ``total`` samples from pieces (positions in the batch, their samples)."""
    if len(pieces) == 1:
        return pieces[0][1]

    def place(parts: Sequence[tuple[Tensor, Tensor]]) -> Tensor:
        first = parts[0][1]
        out = first.new_empty((total, *first.shape[1:]))
        for positions, values in parts:
            out[positions] = values
        return out

    x0 = pieces[0][1][0]
    inputs: Inputs
    if isinstance(x0, dict):
        inputs = {k: place([(p, b[0][k]) for p, b in pieces]) for k in x0}  # type: ignore[index]
    else:
        inputs = place([(p, b[0]) for p, b in pieces])  # type: ignore[misc]
    labels = {t: place([(p, b[1][t]) for p, b in pieces]) for t in pieces[0][1][1]}
    return inputs, labels


class _Passes:
    """Indices of one dataset in shuffled passes: a new permutation when one is used up."""

    def __init__(self, n: int, rng: np.random.Generator) -> None:
        self.n, self.rng = n, rng
        self.order = rng.permutation(n)
        self.pos = 0

    def take(self, k: int) -> np.ndarray:
        out = []
        while k > 0:
            if self.pos == self.n:
                self.order, self.pos = self.rng.permutation(self.n), 0
            chunk = self.order[self.pos : self.pos + k]
            self.pos += len(chunk)
            k -= len(chunk)
            out.append(chunk)
        if len(out) == 1:
            return out[0]
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


# ----------------------------------------------------------------------------------- the mixer
class MultiTaskMixer:
    """Training batches from several datasets (a ``BatchSource`` for the ``Trainer``).

    Yields ``(inputs, {task: labels})`` with a label tensor for every task of ``tasks``; tasks a
    batch's samples do not feed have missing labels (their loss is exactly zero).

    Args:
        datasets: the ``TaskDataset``s (at least one).
        tasks: the model's tasks; every one must be fed by some dataset.
        batch_size: samples per batch *per process* (the global batch is
            ``batch_size · world_size``).
        sampler: a ``Sampler`` or a name from ``polytask.data.samplers.SAMPLERS`` (built with
            ``sampler_params``).
        batch_mode: ``"single"`` (one dataset per batch) or ``"mixed"`` (one dataset per sample;
            the datasets must share one input layout).
        epoch: ``"steps:N"``, ``"largest"``, ``"smallest"`` or ``"sum"`` (see ``epoch_steps``).
        total_epochs: the run's epochs (the ``annealed`` sampler's E).
        seed: the draw of epoch ``e`` depends only on ``(seed, e)``.
        rank, world_size: this process's share under data parallelism.
    """

    def __init__(
        self,
        datasets: Sequence[TaskDataset],
        tasks: Sequence[TaskSpec],
        batch_size: int,
        *,
        sampler: Sampler | str = "proportional",
        sampler_params: Mapping[str, Any] | None = None,
        batch_mode: BatchMode = "mixed",
        epoch: str = "sum",
        total_epochs: int = 1,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if not datasets:
            raise DataError("MultiTaskMixer needs at least one dataset")
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, found {batch_size}")
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside 0..{world_size - 1}")
        if batch_mode not in BATCH_MODES:
            raise ConfigError(f"batch_mode {batch_mode!r}: expected 'single' or 'mixed'")
        names = [ds.name for ds in datasets]
        if len(set(names)) != len(names):
            raise DataError(f"dataset names must be unique, found {names}")
        for ds in datasets:
            if len(ds) == 0:
                raise DataError(f"dataset {ds.name!r} has no training samples")
        self.datasets = list(datasets)
        self.tasks = list(tasks)
        self.sampler = (
            build_sampler(sampler, sampler_params) if isinstance(sampler, str) else sampler
        )
        self.sampler.bind(names)
        self.batch_mode = batch_mode
        self.epoch_spec = epoch
        parse_epoch(epoch)
        self.total_epochs = max(1, int(total_epochs))
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.sizes = [len(ds) for ds in datasets]
        self._labels = _fill_labels(self.datasets, self.tasks)
        if batch_mode == "mixed":
            self._check_layouts()
        self._labelled = [
            {
                t.name: self._labelled_mask(t, labels[t.name])
                for t in self.tasks
                if t.name in set(ds.task_names)
            }
            for ds, labels in zip(self.datasets, self._labels, strict=True)
        ]
        self.epoch = 1
        self.position = 0
        self._resume: tuple[int, int] | None = None
        self._seen = np.zeros(len(self.tasks), dtype=np.int64)

    def _check_layouts(self) -> None:
        first = self.datasets[0]
        want = _layout(first.data.inputs), {t: _layout(y) for t, y in self._labels[0].items()}
        for ds, labels in zip(self.datasets[1:], self._labels[1:], strict=True):
            got = _layout(ds.data.inputs), {t: _layout(y) for t, y in labels.items()}
            if got[0] != want[0]:
                raise DataError(
                    f"batch_mode 'mixed' needs one input layout: dataset {ds.name!r} has inputs "
                    f"{got[0]}, dataset {first.name!r} has {want[0]} (use batch_mode 'single')"
                )
            for task, layout in got[1].items():
                if layout != want[1][task]:
                    raise DataError(
                        f"batch_mode 'mixed': labels of task {task!r} are {layout} in dataset "
                        f"{ds.name!r} but {want[1][task]} in {first.name!r}"
                    )

    @staticmethod
    def _labelled_mask(task: TaskSpec, labels: Tensor) -> np.ndarray:
        mask = task.label_mask(labels)
        if mask.dim() > 1:
            mask = mask.reshape(len(mask), -1).any(dim=1)
        return mask.cpu().numpy()

    # ------------------------------------------------------------------ BatchSource
    @property
    def global_batch(self) -> int:
        """Samples drawn per step over all processes."""
        return self.batch_size * self.world_size

    def set_epoch(self, epoch: int) -> None:
        """Draw epoch ``epoch`` (from 1) next; resets ``seen_counts``."""
        self.epoch = int(epoch)
        self.position = 0
        self._seen[:] = 0
        if self._resume is not None and self._resume[0] != self.epoch:
            self._resume = None

    def __len__(self) -> int:
        return epoch_steps(self.epoch_spec, self.sizes, self.global_batch)

    def probabilities(self, epoch: int | None = None) -> np.ndarray:
        """The sampler's probability of each dataset at ``epoch`` (default: the current one)."""
        e = self.epoch if epoch is None else epoch
        p = np.asarray(self.sampler.probabilities(self.sizes, e, self.total_epochs), np.float64)
        if p.shape != (len(self.sizes),) or not np.all(p >= 0) or not np.isclose(p.sum(), 1.0):
            raise DataError(f"sampler {self.sampler!r} gave invalid probabilities {p.tolist()}")
        return p / p.sum()

    def _rng(self, stream: int, *extra: int) -> np.random.Generator:
        return np.random.default_rng(
            [stream, self.seed & 0xFFFF_FFFF_FFFF_FFFF, self.epoch, *extra]
        )

    def _plan(self) -> Iterator[list[tuple[int, np.ndarray, np.ndarray]]]:
        """The global batches of the current epoch: per batch, ``(dataset, positions in the
        batch, sample indices)`` for each dataset it draws from."""
        steps, size = len(self), self.global_batch
        p = self.probabilities()
        assign_rng = self._rng(_ASSIGN_STREAM)
        passes = [_Passes(n, self._rng(_ORDER_STREAM, d)) for d, n in enumerate(self.sizes)]
        first_step = (self.epoch - 1) * steps
        for step in range(steps):
            if self.batch_mode == "single":
                d = int(self.sampler.assign(assign_rng, p, 1, first_step + step)[0])
                yield [(d, np.arange(size), passes[d].take(size))]
                continue
            which = self.sampler.assign(assign_rng, p, size, (first_step + step) * size)
            pieces = []
            for d in np.unique(which):
                positions = np.flatnonzero(which == d)
                pieces.append((int(d), positions, passes[d].take(len(positions))))
            yield pieces

    def __iter__(self) -> Iterator[Batch]:
        start = 0
        if self._resume is not None and self._resume[0] == self.epoch:
            start = self._resume[1]
        self._resume = None
        self.position = 0
        self._seen[:] = 0
        share = -(-self.global_batch // self.world_size)
        lo, hi = self.rank * share, (self.rank + 1) * share
        for step, pieces in enumerate(self._plan()):
            for d, _, index in pieces:
                for i, task in enumerate(self.tasks):
                    mask = self._labelled[d].get(task.name)
                    if mask is not None:
                        self._seen[i] += int(mask[index].sum())
            self.position = step + 1
            if step < start:
                continue
            mine = []
            for d, positions, index in pieces:
                keep = (positions >= lo) & (positions < hi)
                if keep.any():
                    rows = torch.as_tensor(index[keep])
                    batch = (
                        take_inputs(self.datasets[d].data.inputs, rows),
                        {t: y[rows] for t, y in self._labels[d].items()},
                    )
                    mine.append((torch.as_tensor(positions[keep] - lo), batch))
            yield _assemble(mine, min(hi, self.global_batch) - lo)

    # ------------------------------------------------------------------ reporting and state
    def seen_counts(self) -> dict[str, int]:
        """Labelled samples of each task drawn so far this epoch, over all processes."""
        return {t.name: int(c) for t, c in zip(self.tasks, self._seen, strict=True)}

    def state_dict(self) -> dict[str, Any]:
        """JSON-ready: the epoch, the batches of it already drawn, and what the draw depends on
        (checked on load)."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "sampler": type(self.sampler).__name__,
            "sizes": list(self.sizes),
            "global_batch": self.global_batch,
            "batch_mode": self.batch_mode,
            "epoch_spec": self.epoch_spec,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue where ``state`` left off: the next ``set_epoch`` of the same epoch (or the
        next iteration) resumes after the batches already drawn."""
        for key in ("seed", "sizes", "global_batch", "batch_mode", "epoch_spec", "sampler"):
            mine = self.state_dict()[key]
            if key in state and state[key] != mine:
                raise DataError(
                    f"sampler state: {key} was {state[key]!r} when saved, now {mine!r}; "
                    "a resumed run needs the same datasets and settings"
                )
        self.epoch = int(state["epoch"])
        self.position = 0
        self._seen[:] = 0
        self._resume = (self.epoch, int(state.get("position", 0)))


# ----------------------------------------------------------------------------------- evaluation
def evaluation_batches(
    datasets: Sequence[TaskDataset],
    tasks: Sequence[TaskSpec],
    batch_size: int,
    *,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[Batch]:
    """Batches of every dataset in turn, in order, with every task's labels (missing where a
    dataset does not feed the task): ``evaluate(model, evaluation_batches(...), tasks)`` scores
    each task on its own datasets. Under data parallelism, this process's share."""
    for ds, labels in zip(datasets, _fill_labels(datasets, tasks), strict=True):
        loader = BatchLoader(
            MultiLabelDataset(ds.data.inputs, labels), batch_size, rank=rank, world_size=world_size
        )
        yield from loader


# ----------------------------------------------------------------------------------- bundles
def _rows(inputs: Inputs, start: int, stop: int) -> Inputs:
    if isinstance(inputs, dict):
        return {k: v[start:stop] for k, v in inputs.items()}
    return inputs[start:stop]


def train_parts(bundle: DataBundle) -> list[TaskDataset]:
    """The training rows of each table of ``bundle`` (``build_bundle``) as a ``TaskDataset``
    feeding that table's tasks (views, no copies)."""
    parts = bundle.info.get("datasets")
    if not parts:
        raise DataError("this bundle records no datasets: build it with build_bundle")
    out = []
    for part in parts:
        start, stop = part["train_rows"]
        data = MultiLabelDataset(
            _rows(bundle.train.inputs, start, stop),
            {t: y[start:stop] for t, y in bundle.train.targets.items()},
        )
        out.append(TaskDataset(part["name"], data, tuple(part["tasks"])))
    return out


def mixer_from_bundle(
    bundle: DataBundle,
    batch_size: int,
    *,
    sampler: str = "proportional",
    sampler_params: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> MultiTaskMixer:
    """A ``MultiTaskMixer`` over the training parts of ``bundle`` (``train_parts``); a
    sampler that takes the datasets' ``weights`` (``fixed``) gets the weights recorded in the
    bundle. ``kwargs`` go to ``MultiTaskMixer``."""
    weights = {p["name"]: p.get("weight") for p in bundle.info.get("datasets", ())}
    built = build_sampler(sampler, sampler_params, weights=weights)
    return MultiTaskMixer(train_parts(bundle), bundle.tasks, batch_size, sampler=built, **kwargs)
