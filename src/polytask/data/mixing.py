"""Several datasets, one model: samplers, the mixer that draws batches from them, and epochs.

Each task (or group of tasks) may come with its own dataset, of its own size. A
``MultiTaskMixer`` draws training batches from a list of ``TaskDataset``s:

* a **sampler** (``SAMPLERS``, by name) gives each dataset a probability per epoch:
  ``proportional`` (p ∝ n), ``uniform``, ``temperature`` (p ∝ n^(1/T)), ``round_robin``
  (deterministic cycling), ``annealed`` (Stickland & Murray, ICML 2019) and ``fixed`` (a
  user-given mix);
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

Example:
    >>> import torch
    >>> from polytask.data.multilabel import MultiLabelDataset
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

import inspect
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import Tensor

from polytask.data.multilabel import (
    Batch,
    BatchLoader,
    DataBundle,
    MultiLabelDataset,
    MultiLabelTable,
    build_bundle,
    split_indices,
)
from polytask.data.preprocess import Inputs, take_inputs
from polytask.data.sources import DATASETS
from polytask.errors import ConfigError, DataError
from polytask.registry import Registry
from polytask.tasks import TaskSpec

__all__ = [
    "SAMPLERS",
    "AnnealedSampler",
    "FixedSampler",
    "MultiTaskMixer",
    "ProportionalSampler",
    "RoundRobinSampler",
    "Sampler",
    "TaskDataset",
    "TemperatureSampler",
    "UniformSampler",
    "build_datasets_bundle",
    "build_mixed_bundle",
    "build_sampler",
    "epoch_steps",
    "evaluation_batches",
    "mixer_from_bundle",
    "parse_epoch",
    "select_tasks",
    "train_parts",
]

BatchMode = Literal["single", "mixed"]
BATCH_MODES: tuple[str, ...] = ("single", "mixed")

# random streams of one epoch: which dataset each draw uses, and each dataset's shuffles
_ASSIGN_STREAM = 7_001
_ORDER_STREAM = 7_002


# ----------------------------------------------------------------------------------- samplers
class Sampler:
    """How often each dataset is drawn: ``probabilities(sizes, epoch, total_epochs)``.

    ``sizes`` are the training sizes of the datasets, ``epoch`` counts from 1 and
    ``total_epochs`` is the run's number of epochs. ``assign`` turns the probabilities into the
    dataset of each of ``count`` consecutive draws (``start`` is the index of the first draw in
    the whole run): i.i.d. draws by default, a fixed cycle for ``round_robin``.
    """

    name: ClassVar[str] = "sampler"

    def probabilities(self, sizes: Sequence[int], epoch: int, total_epochs: int) -> np.ndarray:
        """One probability per dataset (non-negative, summing to 1)."""
        raise NotImplementedError

    def assign(
        self, rng: np.random.Generator, probabilities: np.ndarray, count: int, start: int
    ) -> np.ndarray:
        """The dataset index (``int64``) of each of ``count`` draws."""
        return rng.choice(len(probabilities), size=count, p=probabilities).astype(np.int64)

    def bind(self, names: Sequence[str]) -> None:
        """Called by the mixer with its datasets' names; raise ``ConfigError`` when this sampler
        cannot serve them."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _power_probabilities(sizes: Sequence[int], alpha: float) -> np.ndarray:
    """``p_i ∝ n_i^alpha``, computed in log space (no overflow for large ``n``)."""
    logs = alpha * np.log(np.asarray(sizes, dtype=np.float64))
    weights = np.exp(logs - logs.max())
    return weights / weights.sum()


SAMPLERS: Registry[Callable[..., Sampler]] = Registry("sampler", provided=("weights",))


@SAMPLERS.register("proportional", "p ∝ dataset size: every training sample equally often")
class ProportionalSampler(Sampler):
    """p_i ∝ n_i: each sample of every dataset is drawn equally often (small tasks are seen
    rarely)."""

    name = "proportional"

    def probabilities(self, sizes: Sequence[int], epoch: int, total_epochs: int) -> np.ndarray:
        return _power_probabilities(sizes, 1.0)


@SAMPLERS.register("uniform", "every dataset equally often, whatever its size")
class UniformSampler(Sampler):
    """p_i = 1/D: every dataset is drawn equally often (small datasets are oversampled)."""

    name = "uniform"

    def probabilities(self, sizes: Sequence[int], epoch: int, total_epochs: int) -> np.ndarray:
        return np.full(len(sizes), 1.0 / len(sizes))


@SAMPLERS.register("temperature", "p ∝ n^(1/T): T=1 proportional, T→∞ uniform")
class TemperatureSampler(Sampler):
    """Temperature-scaled sampling, p_i ∝ n_i^(1/T), as in multilingual translation
    (Arivazhagan et al., 2019) and multi-task NLP: ``temperature=1`` is proportional, larger
    temperatures move toward uniform.

    Args:
        temperature: T > 0.
    """

    name = "temperature"

    def __init__(self, temperature: float = 2.0) -> None:
        if not temperature > 0 or not math.isfinite(temperature):
            raise ConfigError(
                f"sampler 'temperature': temperature must be > 0, found {temperature}"
            )
        self.temperature = float(temperature)

    def probabilities(self, sizes: Sequence[int], epoch: int, total_epochs: int) -> np.ndarray:
        return _power_probabilities(sizes, 1.0 / self.temperature)

    def __repr__(self) -> str:
        return f"TemperatureSampler(temperature={self.temperature})"


@SAMPLERS.register("round_robin", "datasets in turn, one draw each (deterministic cycle)")
class RoundRobinSampler(Sampler):
    """Datasets in a fixed cycle 0, 1, ..., D-1, 0, ... continued across epochs (a batch each in
    ``single`` mode, a sample each in ``mixed`` mode): uniform frequencies without sampling
    noise."""

    name = "round_robin"

    def probabilities(self, sizes: Sequence[int], epoch: int, total_epochs: int) -> np.ndarray:
        return np.full(len(sizes), 1.0 / len(sizes))

    def assign(
        self, rng: np.random.Generator, probabilities: np.ndarray, count: int, start: int
    ) -> np.ndarray:
        return (start + np.arange(count, dtype=np.int64)) % len(probabilities)


@SAMPLERS.register("annealed", "p ∝ n^α, α from 1 to 0.2 over training (Stickland & Murray)")
class AnnealedSampler(Sampler):
    """Annealed sampling: p_i ∝ n_i^α with α = 1 − 0.8·(e − 1)/(E − 1) at epoch e of E, so
    sampling starts proportional to size and ends close to uniform (α = 0.2). With a single
    epoch, α = 1.

    References:
        Stickland, A. C. and Murray, I., 2019. BERT and PALs: Projected Attention Layers for
        Efficient Adaptation in Multi-Task Learning. ICML 2019, section 4 ("annealed sampling").
    """

    name = "annealed"

    @staticmethod
    def alpha(epoch: int, total_epochs: int) -> float:
        """α at ``epoch`` (1-based, clamped to 1..total_epochs)."""
        if total_epochs <= 1:
            return 1.0
        e = min(max(epoch, 1), total_epochs)
        return 1.0 - 0.8 * (e - 1) / (total_epochs - 1)

    def probabilities(self, sizes: Sequence[int], epoch: int, total_epochs: int) -> np.ndarray:
        return _power_probabilities(sizes, self.alpha(epoch, total_epochs))


@SAMPLERS.register("fixed", "a user-given mix: each dataset's `weight`, normalised")
class FixedSampler(Sampler):
    """A fixed mix: p_i = w_i / Σ w. In a configuration each entry of ``data.datasets`` gives
    its ``weight``.

    Args:
        weights: one non-negative weight per dataset, in order, or by dataset name.
    """

    name = "fixed"

    def __init__(self, weights: Sequence[float] | Mapping[str, float]) -> None:
        if weights is None:
            raise ConfigError("sampler 'fixed' needs weights: give each dataset a `weight`")
        self.weights = weights
        self._bound: np.ndarray | None = None

    def bind(self, names: Sequence[str]) -> None:
        self._bound = self._resolve(names)

    def _resolve(self, names: Sequence[str]) -> np.ndarray:
        if isinstance(self.weights, Mapping):
            missing = [n for n in names if n not in self.weights]
            if missing:
                raise ConfigError(
                    f"sampler 'fixed': no weight for dataset {missing[0]!r} "
                    f"(weights given for {', '.join(map(repr, self.weights)) or 'none'})"
                )
            extra = [n for n in self.weights if n not in names]
            if extra:
                raise ConfigError(f"sampler 'fixed': weight for unknown dataset {extra[0]!r}")
            values = [self.weights[n] for n in names]
        else:
            values = list(self.weights)
            if len(values) != len(names):
                raise ConfigError(
                    f"sampler 'fixed': {len(values)} weight(s) for {len(names)} datasets "
                    f"({', '.join(map(repr, names))})"
                )
        for name, value in zip(names, values, strict=True):
            if value is None or not math.isfinite(float(value)) or float(value) < 0:
                raise ConfigError(
                    f"sampler 'fixed': dataset {name!r} needs a weight >= 0, found {value}"
                )
        w = np.asarray(values, dtype=np.float64)
        if w.sum() <= 0:
            raise ConfigError("sampler 'fixed': the weights sum to 0; give some dataset weight > 0")
        return w / w.sum()

    def probabilities(self, sizes: Sequence[int], epoch: int, total_epochs: int) -> np.ndarray:
        if self._bound is not None and len(self._bound) == len(sizes):
            return self._bound
        if isinstance(self.weights, Mapping):
            raise ConfigError("sampler 'fixed': weights by name need the mixer's dataset names")
        return self._resolve([f"#{i}" for i in range(len(sizes))])

    def __repr__(self) -> str:
        return f"FixedSampler(weights={self.weights!r})"


def build_sampler(
    name: str,
    params: Mapping[str, Any] | None = None,
    *,
    weights: Sequence[float | None] | Mapping[str, float | None] | None = None,
) -> Sampler:
    """The sampler registered as ``name`` with ``params`` (and the datasets' ``weights`` when
    it takes them: ``fixed``); unknown names and parameters fail with a ``ConfigError`` listing
    the valid ones."""
    if name not in SAMPLERS:
        raise ConfigError(f"unknown sampler {name!r}; known: {', '.join(SAMPLERS.names())}")
    problems = SAMPLERS.check_params(name, params or {})
    if problems:
        raise ConfigError("; ".join(problems))
    builder = SAMPLERS.get(name)
    takes_weights = "weights" in inspect.signature(builder).parameters
    provided = {"weights": weights} if takes_weights else {}
    return builder(**(params or {}), **provided)


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


def _missing_labels(task: TaskSpec, template: Tensor | None, n: int) -> Tensor:
    """``n`` missing labels of ``task`` (an expanded view: no memory per sample)."""
    if template is not None:
        shape, dtype = tuple(template.shape[1:]), template.dtype
    else:
        wide = task.kind == "multilabel" or (task.kind == "regression" and task.num_classes > 1)
        shape = (task.num_classes,) if wide else ()
        dtype = torch.int64 if task.kind == "multiclass" else torch.float32
    fill = -1 if task.kind == "multiclass" else float("nan")
    return torch.full((1, *shape), fill, dtype=dtype).expand(n, *shape)


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
                else _missing_labels(t, templates.get(t.name), len(ds))
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
        sampler: a ``Sampler`` or a name from ``SAMPLERS`` (built with ``sampler_params``).
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


# ----------------------------------------------------------------------------------- tables
def select_tasks(table: MultiLabelTable, names: Sequence[str]) -> MultiLabelTable:
    """``table`` restricted to the tasks ``names`` (in the table's order), in place."""
    keep = set(names)
    table.tasks = [t for t in table.tasks if t.name in keep]
    table.targets = {t.name: table.targets[t.name] for t in table.tasks}
    return table


def _same_task(a: TaskSpec, b: TaskSpec) -> bool:
    return (a.kind, a.num_classes, a.loss_name, a.metric_names, a.weight) == (
        b.kind,
        b.num_classes,
        b.loss_name,
        b.metric_names,
        b.weight,
    )


def _raw_layout(inputs: Any) -> Any:
    def one(block: Any) -> Any:
        if isinstance(block, list):
            return "list"
        return tuple(np.asarray(block).shape[1:])

    if isinstance(inputs, dict):
        return {k: one(v) for k, v in sorted(inputs.items())}
    return one(inputs)


def _concat_blocks(blocks: Sequence[Any]) -> Any:
    if isinstance(blocks[0], list):
        return [v for block in blocks for v in block]
    return np.concatenate([np.asarray(b) for b in blocks])


def _concat_targets(task: TaskSpec, tables: Sequence[MultiLabelTable]) -> np.ndarray:
    template = next(np.asarray(t.targets[task.name]) for t in tables if task.name in t.targets)
    parts = []
    for table in tables:
        if task.name in table.targets:
            parts.append(np.asarray(table.targets[task.name]))
            continue
        fill = -1 if task.kind == "multiclass" else np.nan
        dtype = (
            template.dtype if task.kind == "multiclass" else np.result_type(template, np.float32)
        )
        parts.append(np.full((len(table), *template.shape[1:]), fill, dtype=dtype))
    dtype = np.result_type(*parts)
    return np.concatenate([p.astype(dtype, copy=False) for p in parts])


def build_mixed_bundle(
    tables: Sequence[tuple[str, MultiLabelTable]],
    *,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 0,
    standardize: bool = True,
    weights: Sequence[float | None] | None = None,
) -> DataBundle:
    """One ``DataBundle`` over several named tables that share an input layout.

    Each table is split on its own (its fixed split, or a seeded ``val_fraction`` /
    ``test_fraction`` split), then the tables are stacked, the labels of the tasks a table does
    not have are missing, and ``build_bundle`` fits one input preprocessing on the union of the
    training rows (so one model, and ``predict``, see one input space) and each regression
    task's target scale on its own labelled rows. The validation and test splits hold every
    table's rows: evaluating them scores each task on its own datasets. ``info["datasets"]``
    records each table's name, tasks, split sizes and row range in ``train`` (see
    ``train_parts``). A task may come from several tables when its definition is the same in
    each; its labels are then pooled.
    """
    if not tables:
        raise DataError("no datasets given")
    names = [name for name, _ in tables]
    if len(set(names)) != len(names):
        raise DataError(f"dataset names must be unique, found {names}")
    first_name, first = tables[0]
    tasks: dict[str, TaskSpec] = {}
    origin: dict[str, str] = {}
    for name, table in tables:
        table.validate()
        if not table.tasks:
            raise DataError(f"dataset {name!r} has no tasks")
        if _raw_layout(table.inputs) != _raw_layout(first.inputs):
            raise DataError(
                f"dataset {name!r}: input layout {_raw_layout(table.inputs)} differs from "
                f"dataset {first_name!r}'s {_raw_layout(first.inputs)}; one model needs one input "
                "layout"
            )
        for attr in ("feature_names", "categorical_names"):
            mine, theirs = getattr(table, attr), getattr(first, attr)
            if mine is not None and theirs is not None and list(mine) != list(theirs):
                raise DataError(
                    f"dataset {name!r}: its {attr.replace('_', ' ')} differ from dataset "
                    f"{first_name!r}'s; one model needs the same input columns in the same order"
                )
        for task in table.tasks:
            known = tasks.get(task.name)
            if known is not None and not _same_task(known, task):
                raise DataError(
                    f"task {task.name!r} is defined differently in dataset {name!r} "
                    f"({task.kind}, {task.num_classes}) and {origin[task.name]!r} "
                    f"({known.kind}, {known.num_classes})"
                )
            tasks.setdefault(task.name, task)
            origin.setdefault(task.name, name)

    splits: list[np.ndarray] = []
    info: list[dict[str, Any]] = []
    for name, table in tables:
        if table.split is not None:
            codes = np.asarray(table.split).astype(np.int64)
        else:
            parts = split_indices(
                len(table), val_fraction=val_fraction, test_fraction=test_fraction, seed=seed
            )
            codes = np.zeros(len(table), dtype=np.int64)
            codes[parts["val"]] = 1
            codes[parts["test"]] = 2
        sizes = {s: int((codes == i).sum()) for i, s in enumerate(("train", "val", "test"))}
        if sizes["train"] == 0:
            raise DataError(f"dataset {name!r} ({table.source}): the training split is empty")
        splits.append(codes)
        tasks_of = [t.name for t in table.tasks]
        info.append({"name": name, "source": table.source, "tasks": tasks_of, "sizes": sizes})
    start = 0
    for i, entry in enumerate(info):
        entry["train_rows"] = [start, start + entry["sizes"]["train"]]
        start += entry["sizes"]["train"]
        if weights is not None and weights[i] is not None:
            entry["weight"] = weights[i]

    raw_tables = [t for _, t in tables]
    if isinstance(first.inputs, dict):
        inputs: Any = {k: _concat_blocks([t.inputs[k] for t in raw_tables]) for k in first.inputs}
    else:
        inputs = _concat_blocks([t.inputs for t in raw_tables])
    preprocessors: dict[str, Any] = {}
    for table in raw_tables:
        for key, pre in table.preprocessors.items():
            preprocessors.setdefault(key, pre)
    task_list = list(tasks.values())
    combined = MultiLabelTable(
        inputs=inputs,
        targets={t.name: _concat_targets(t, raw_tables) for t in task_list},
        tasks=task_list,
        feature_names=first.feature_names,
        split=np.concatenate(splits),
        source="+".join(names),
        categorical_names=first.categorical_names,
        preprocessors=preprocessors,
    )
    bundle = build_bundle(combined, seed=seed, standardize=standardize)
    bundle.info["datasets"] = info
    return bundle


def build_datasets_bundle(
    entries: Sequence[Mapping[str, Any]],
    *,
    seed: int,
    tasks: Sequence[str] | None = None,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    standardize: bool = True,
    field: str = "data.datasets",
) -> DataBundle:
    """Build each entry's dataset (``{dataset, params, tasks, weight}``, as in a configuration's
    ``data.datasets``) from ``DATASETS``, keep its ``tasks`` (and only ``tasks`` overall when
    given, e.g. for a single-task baseline: entries left without a task are dropped), and stack
    them with ``build_mixed_bundle``. A dataset listed twice is named ``name[i]``.
    ``ConfigError`` names the entry (``field.i``) of an unknown task."""
    counts: dict[str, int] = {}
    for entry in entries:
        counts[entry["dataset"]] = counts.get(entry["dataset"], 0) + 1
    tables: list[tuple[str, MultiLabelTable]] = []
    weights: list[float | None] = []
    offered: list[str] = []
    for i, entry in enumerate(entries):
        table = DATASETS.get(entry["dataset"])(seed=seed, **(entry.get("params") or {}))
        known = [t.name for t in table.tasks]
        names = list(entry.get("tasks") or known)
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ConfigError(
                f"{field}.{i}.tasks: unknown task(s) {', '.join(unknown)} for dataset "
                f"{entry['dataset']!r}; known: {', '.join(known)}"
            )
        offered += [n for n in names if n not in offered]
        if tasks is not None:
            names = [n for n in names if n in tasks]
        if not names:
            continue
        name = entry["dataset"] if counts[entry["dataset"]] == 1 else f"{entry['dataset']}[{i}]"
        tables.append((name, select_tasks(table, names)))
        weights.append(entry.get("weight"))
    if tasks is not None:
        unknown = [n for n in tasks if n not in offered]
        if unknown:
            raise ConfigError(
                f"data.tasks: unknown task(s) {', '.join(unknown)}; the datasets give "
                f"{', '.join(offered)}"
            )
    return build_mixed_bundle(
        tables,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        seed=seed,
        standardize=standardize,
        weights=weights,
    )


def _rows(inputs: Inputs, start: int, stop: int) -> Inputs:
    if isinstance(inputs, dict):
        return {k: v[start:stop] for k, v in inputs.items()}
    return inputs[start:stop]


def train_parts(bundle: DataBundle) -> list[TaskDataset]:
    """The training datasets of a bundle made by ``build_mixed_bundle`` (views, no copies)."""
    parts = bundle.info.get("datasets")
    if not parts:
        raise DataError("this bundle was not built from several datasets (build_mixed_bundle)")
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
    """A ``MultiTaskMixer`` over the training parts of ``bundle`` (``build_mixed_bundle``); a
    sampler that takes the datasets' ``weights`` (``fixed``) gets the weights recorded in the
    bundle. ``kwargs`` go to ``MultiTaskMixer``."""
    weights = {p["name"]: p.get("weight") for p in bundle.info.get("datasets", ())}
    built = build_sampler(sampler, sampler_params, weights=weights)
    return MultiTaskMixer(train_parts(bundle), bundle.tasks, batch_size, sampler=built, **kwargs)
