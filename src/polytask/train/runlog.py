"""The run log: one JSON object per epoch in ``run_dir/metrics.jsonl``, and its curves.

A record looks like::

    {"epoch": 1, "step": 120, "lr": 0.001, "time_s": 3.2,
     "train": {"left": {"loss": 0.7, "absent_steps": 0}, ...},
     "val": {"left": {"accuracy": 0.9, "macro_f1": 0.88, "loss": 0.3}, ...},
     "weights": {"left": 1.0, "right": 1.0}}

Non-finite floats are written as ``null`` so every line is valid JSON. Lines are appended and
flushed one at a time, so a crash loses at most the line being written; a torn last line is
skipped (with a warning) when the log is read. When a run resumes from a checkpoint,
:func:`truncate_after` drops the lines of the epochs that ran after it. ``RunLog`` keeps a
training run's files together: this log, the checkpoints and the curves.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from polytask.errors import CheckpointError
from polytask.io import atomic_path, remove_temporaries, strict_json, write_text_atomic
from polytask.train.checkpoint import copy_checkpoint, read_checkpoint_metadata, save_run_checkpoint
from polytask.train.trackers import Tracker, open_trackers, scalars

__all__ = [
    "METRICS_FILE",
    "MetricsLog",
    "RunLog",
    "epoch_record",
    "plot_curves",
    "read_metrics",
    "reconcile_best",
    "truncate_after",
]

METRICS_FILE = "metrics.jsonl"
"""Name of the metrics log inside a run folder."""


# --------------------------------------------------------------------------- JSON lines


class MetricsLog:
    """Appends records to ``run_dir/metrics.jsonl`` (created, with ``run_dir``, if missing).

    ``location`` is the run folder, or the log file itself when it ends in ``.jsonl``.
    The file is opened for each :meth:`append`, so a :func:`truncate_after` in between
    (which replaces the file) is always seen.
    """

    def __init__(self, location: Path) -> None:
        location = Path(location)
        self.path: Path = location if location.suffix == ".jsonl" else location / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.touch(exist_ok=True)

    def append(self, record: Mapping[str, Any]) -> None:
        """Write ``record`` as one line and flush it; nan/inf become ``null``."""
        line = strict_json(record) + "\n"
        with open(self.path, "a+b") as file:
            # A crash may have left a torn line without its newline: keep it on its own line.
            if file.seek(0, os.SEEK_END) > 0:
                file.seek(-1, os.SEEK_END)
                if file.read(1) != b"\n":
                    line = "\n" + line
            file.write(line.encode("utf-8"))
            file.flush()

    def read(self) -> list[dict[str, Any]]:
        """All records so far (see :func:`read_metrics`)."""
        return read_metrics(self.path)

    def __repr__(self) -> str:
        return f"MetricsLog({str(self.path)!r})"


def epoch_record(
    *,
    epoch: int,
    step: int,
    lr: float,
    seconds: float,
    train: Mapping[str, Any],
    val: Mapping[str, Any],
    monitor: Mapping[str, Any],
    seen: Callable[[], Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """An epoch's record: ``train`` holds the ``train``, ``weights``, ``data_wait_fraction`` and
    ``train_time_s`` entries; ``seen``, when given, counts the labelled samples each task drew
    this epoch (several datasets)."""
    record = {
        "epoch": epoch,
        "step": step,
        "lr": lr,
        "time_s": round(seconds, 4),
        **train,
        "val": val,
        "monitor": dict(monitor),
    }
    if callable(seen):
        record["seen"] = seen()
    return record


def _parse_lines(path: Path, text: str) -> list[tuple[str, dict[str, Any]]]:
    """(line, record) pairs; blank lines skipped, unparsable ones skipped with a warning."""
    pairs: list[tuple[str, dict[str, Any]]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            warnings.warn(
                f"{path}:{number}: skipped a line that is not a JSON object (torn write?)",
                RuntimeWarning,
                stacklevel=3,
            )
            continue
        pairs.append((line, record))
    return pairs


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path}: metrics log not found") from exc
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read metrics log ({exc})") from exc


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Records of a ``metrics.jsonl`` file (a run folder is also accepted), in file order.

    Raises ``CheckpointError`` when the file is missing or unreadable.
    """
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    return [record for _, record in _parse_lines(path, _read_text(path))]


def truncate_after(path: Path, epoch: int) -> None:
    """Keep only the records with a numeric ``record["epoch"] <= epoch``, atomically.

    Records without an epoch and unparsable lines are dropped too. A missing file is left
    missing (nothing to truncate); a run folder is also accepted.
    """
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.exists():
        return
    kept = [
        line
        for line, record in _parse_lines(path, _read_text(path))
        if _number(record.get("epoch")) is not None and record["epoch"] <= epoch
    ]
    write_text_atomic(path, "".join(line + "\n" for line in kept))


# --------------------------------------------------------------------------- curves


def _number(value: Any) -> float | None:
    """``value`` as a finite float, or ``None`` (missing, null, bool, text, nan...)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _section(record: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = record.get(name)
    return value if isinstance(value, Mapping) else {}


class _Series:
    """Named (epoch -> value) series in first-seen order; a later epoch value wins."""

    def __init__(self) -> None:
        self.points: dict[str, dict[float, float]] = {}

    def add(self, name: str, epoch: float, value: Any) -> None:
        number = _number(value)
        if number is not None:
            self.points.setdefault(name, {})[epoch] = number

    def items(self) -> list[tuple[str, list[float], list[float]]]:
        out = []
        for name, points in self.points.items():
            xs = sorted(points)
            out.append((name, xs, [points[x] for x in xs]))
        return out


_SEEN_PANEL = "\0seen"


def _collect(
    records: list[dict[str, Any]],
) -> tuple[list[str], dict[str, _Series], dict[str, _Series], _Series, _Series]:
    """Task names, per-task loss series, per-task validation metric series, weights, and the
    labelled samples each task saw per epoch (several datasets)."""
    tasks: dict[str, None] = {}
    losses: dict[str, _Series] = {}
    metrics: dict[str, _Series] = {}
    weights = _Series()
    seen = _Series()
    for record in records:
        if not isinstance(record, Mapping):
            continue
        epoch = _number(record.get("epoch"))
        if epoch is None:
            continue
        train, val = _section(record, "train"), _section(record, "val")
        for task in [*train, *val, *_section(record, "weights")]:
            tasks.setdefault(str(task), None)
        for task, entry in train.items():
            if isinstance(entry, Mapping):
                losses.setdefault(str(task), _Series()).add("train loss", epoch, entry.get("loss"))
        for task, entry in val.items():
            if not isinstance(entry, Mapping):
                continue
            for metric, value in entry.items():
                if metric == "loss":
                    losses.setdefault(str(task), _Series()).add("val loss", epoch, value)
                else:
                    metrics.setdefault(str(task), _Series()).add(f"val {metric}", epoch, value)
        for task, value in _section(record, "weights").items():
            weights.add(str(task), epoch, value)
        for task, value in _section(record, "seen").items():
            seen.add(str(task), epoch, value)
    return list(tasks), losses, metrics, weights, seen


#: panels with more lines than this (e.g. the weights of 40 tasks) get no legend
MAX_LEGEND_LINES = 12


def _draw(ax: Any, series: _Series | None, ylabel: str) -> None:
    """Plot every line of ``series`` on ``ax`` (a note when there is nothing)."""
    lines = series.items() if series is not None else []
    for name, xs, ys in lines:
        ax.plot(xs, ys, marker="o" if len(xs) <= 30 else None, markersize=3, label=name)
    if len(lines) > MAX_LEGEND_LINES:  # a legend that tall would not fit the panel
        ax.text(0.01, 0.99, f"{len(lines)} lines", va="top", fontsize="small",
                transform=ax.transAxes)  # fmt: skip
    elif lines:
        ax.legend(fontsize="small")
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)


def plot_curves(records: list[dict[str, Any]], path: Path, *, title: str = "") -> None:
    """Write a PNG of the run's curves to ``path`` (atomically).

    One column per task: its train (and validation) loss per epoch on top, its other
    validation metrics below; a last panel shows the balancer's task weights when recorded, and
    another the labelled samples each task saw per epoch when several datasets are mixed.
    Missing keys, nulls and non-finite values are skipped. Columns wrap after 6 panels.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    path = Path(path)
    tasks, losses, metrics, weights, seen = _collect(records)
    panels: list[str | None] = [*tasks, None] if weights.points else list(tasks)
    if seen.points:
        panels.append(_SEEN_PANEL)
    rows_per_block = 2 if metrics else 1
    columns = max(1, min(len(panels), 6))
    blocks = max(1, -(-len(panels) // columns))

    # No pyplot: a standalone Figure on an Agg canvas leaves the global backend untouched.
    fig = Figure(figsize=(4.2 * columns, 3.0 * rows_per_block * blocks + (0.4 if title else 0)))
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(rows_per_block * blocks, columns)
    shared: Any = None
    axes: list[Any] = []

    def new_axes(spec: Any) -> Any:
        nonlocal shared
        ax = fig.add_subplot(spec, sharex=shared)
        shared = shared or ax
        axes.append(ax)
        return ax

    for index, task in enumerate(panels):
        row, column = (index // columns) * rows_per_block, index % columns
        if task is None or task == _SEEN_PANEL:
            ax = new_axes(grid[row : row + rows_per_block, column])
            if task is None:
                ax.set_title("task weights")
                _draw(ax, weights, "weight")
            else:
                ax.set_title("labelled samples seen")
                _draw(ax, seen, "samples / epoch")
            ax.set_xlabel("epoch")
            continue
        ax = new_axes(grid[row, column])
        ax.set_title(task)
        _draw(ax, losses.get(task), "loss")
        if rows_per_block == 2:
            ax = new_axes(grid[row + 1, column])
            _draw(ax, metrics.get(task), "validation metric")
        ax.set_xlabel("epoch")
    if not panels:
        ax = new_axes(grid[0, 0])
        ax.text(0.5, 0.5, "no metrics recorded", ha="center", va="center")
        ax.set_axis_off()
    if shared is not None:
        shared.xaxis.set_major_locator(MaxNLocator(integer=True))
        epochs = {_number(r.get("epoch")) for r in records if isinstance(r, Mapping)}
        epochs.discard(None)
        if len(epochs) == 1:  # a single epoch: a unit-wide axis instead of a 0.1-wide one
            only = float(epochs.pop() or 0.0)
            shared.set_xlim(only - 1, only + 1)
    if title:
        fig.suptitle(title)
    fig.tight_layout()

    try:
        with atomic_path(path) as temporary:
            fig.savefig(temporary, format="png", dpi=100)
    finally:
        fig.clear()  # no pyplot registry to close from; this frees the artists


# --------------------------------------------------------------------------- a run's files


def reconcile_best(directory: Path) -> bool:
    """Copy ``last`` over ``best`` when ``last`` records its own epoch as the best one but
    ``best`` holds another epoch; returns whether it did.

    Each epoch writes ``last`` and then, when it improved, copies it to ``best``; a process
    killed between the two leaves ``best`` one improvement behind. That ``last`` is then the
    best state, so the copy is exact. Any other pair is left alone."""
    last, best = Path(directory) / "last.safetensors", Path(directory) / "best.safetensors"
    if not last.is_file():
        return False
    state = read_checkpoint_metadata(last)
    epoch, stopping = state.get("epoch"), state.get("early_stopping")
    if not isinstance(epoch, int) or not isinstance(stopping, Mapping):
        return False
    if stopping.get("best_epoch") != epoch:
        return False
    try:
        if best.is_file() and read_checkpoint_metadata(best).get("epoch") == epoch:
            return False
    except CheckpointError:  # a torn or corrupt best: last is the best state, replace it
        pass
    copy_checkpoint(last, best)
    return True


def _last_step(records: list[dict[str, Any]]) -> int:
    """The optimizer step of the last record that has one (0 when none)."""
    steps = [_number(r.get("step")) for r in records]
    return int(next((s for s in reversed(steps) if s is not None), 0))


class RunLog:
    """What a training run keeps in ``run_dir``: ``metrics.jsonl``, ``checkpoints/last`` (and
    ``best``) and ``curves.png``. Only the process that ``writes`` (rank 0) touches them; every
    process reads the ``last`` checkpoint to resume. ``run_dir=None`` keeps nothing.

    When ``metadata["config"]`` (the resolved run configuration) names ``train.loggers``, the
    same records also go to those trackers (``polytask.train.trackers``)."""

    def __init__(
        self,
        run_dir: Path | None,
        *,
        writes: bool = True,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        self.run_dir = run_dir
        self.writes = writes
        self.metadata = dict(metadata or {})
        self._log: MetricsLog | None = None
        self.trackers: list[Tracker] = []

    @property
    def last_checkpoint(self) -> Path | None:
        """The checkpoint a resumed run continues from (``None`` without a run folder)."""
        return None if self.run_dir is None else self.run_dir / "checkpoints" / "last.safetensors"

    def start(self, *, resumed_at: int | None = None) -> None:
        """Open the metrics log, cut after the epoch ``resumed_at`` (a fresh run in a reused
        folder starts a fresh log). A resumed run first removes the temporary files a killed
        process left and puts ``best`` back in step with ``last`` (see ``reconcile_best``)."""
        if self.run_dir is None or not self.writes:
            return
        path = self.run_dir / METRICS_FILE
        if resumed_at is not None:
            for folder in (self.run_dir, self.run_dir / "checkpoints"):
                remove_temporaries(folder)
            reconcile_best(self.run_dir / "checkpoints")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resumed_at is not None or path.exists():
            truncate_after(path, resumed_at or 0)
        self._log = MetricsLog(path)
        config = self.metadata.get("config")
        if isinstance(config, Mapping):
            resume_step = None if resumed_at is None else _last_step(self._log.read())
            self.trackers = open_trackers(config, self.run_dir, resume_step=resume_step)

    def epoch(
        self, record: Mapping[str, Any], state: Callable[[], Mapping[str, Any]], *, best: bool
    ) -> None:
        """Append an epoch's ``record`` and save ``state()`` as the ``last`` checkpoint (copied to
        ``best`` when ``best``)."""
        if self._log is None or self.run_dir is None:
            return
        self._log.append(record)
        values = scalars(record) if self.trackers else []
        for tracker in self.trackers:
            tracker.log_scalars(values)
        save_run_checkpoint(self.run_dir / "checkpoints", state(), best=best)

    def finish(self) -> None:
        """Draw ``curves.png`` from the whole log; hand the plots and checkpoints to the
        trackers and close them."""
        if self._log is not None and self.run_dir is not None:
            plot_curves(self._log.read(), self.run_dir / "curves.png")
            for tracker in self.trackers:
                tracker.log_artifacts(self.run_dir)
                tracker.close()
            self.trackers = []
