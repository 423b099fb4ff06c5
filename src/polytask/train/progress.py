"""What a person watching training sees on the console: a progress bar with the running task
losses, one line per epoch, and a note when the balancer reuses its weights between steps."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from polytask.balancing import Balancer
from polytask.tasks import TaskSpec

__all__ = ["ProgressBar", "epoch_line", "losses_text", "note_update_every"]


class ProgressBar:
    """The run's bar (batches done, times, running task losses) and one line per epoch, on
    stderr; shows nothing when not ``enabled`` (``progress=False``, or any rank but 0)."""

    def __init__(
        self, tasks: Sequence[TaskSpec], description: str, *, total: int, enabled: bool
    ) -> None:
        self.tasks, self.enabled = list(tasks), enabled
        self.console = Console(stderr=True)
        self._bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[losses]}"),
            console=self.console,
            disable=not enabled,
            transient=False,
        )
        self._task = self._bar.add_task(description, total=total, losses="")

    def __enter__(self) -> ProgressBar:
        self._bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._bar.__exit__(*exc)

    def completed(self, batches: int) -> None:
        """Show ``batches`` batches as done."""
        self._bar.update(self._task, completed=batches)

    def advance(self, batches: int, means: Sequence[float]) -> None:
        """``batches`` more done; ``means``: each task's running mean loss."""
        self._bar.update(self._task, advance=batches, losses=losses_text(self.tasks, means))

    def epoch_done(self, record: Mapping[str, Any], epochs: int) -> None:
        """Print the epoch's line (see ``epoch_line``)."""
        if self.enabled:
            line = epoch_line(record, self.tasks, epochs)
            self.console.print(line, highlight=False, soft_wrap=True)


def losses_text(tasks: Sequence[TaskSpec], means: Sequence[float]) -> str:
    """``"t1 0.123  t2 0.456"``: the running mean loss of each task."""
    return "  ".join(f"{t.name} {v:.3f}" for t, v in zip(tasks, means, strict=True))


def epoch_line(record: Mapping[str, Any], tasks: Sequence[TaskSpec], epochs: int) -> str:
    """One line for an epoch's record: each task's train loss and first validation metric."""
    parts = [f"epoch {record['epoch']}/{epochs}"]
    for task in tasks:
        metric = task.metric_names[0]
        value = record["val"].get(task.name, {}).get(metric)
        loss = record["train"][task.name]["loss"]
        shown = f"val {metric} {value:.4f}" if value == value and value is not None else ""
        parts.append(f"{task.name}: loss {loss:.4f} {shown}".rstrip())
    parts.append(f"{record['time_s']:.1f}s")
    return " · ".join(parts)


def note_update_every(balancer: Balancer) -> None:
    """Say so (on stderr) when the balancer recomputes its weights only every N steps."""
    update_every = getattr(balancer, "update_every", 1)
    if update_every > 1:
        Console(stderr=True).print(
            f"{type(balancer).__name__}: weights recomputed every {update_every} steps; the "
            f"{update_every - 1} steps between reuse them with one ordinary backward (no "
            "per-task Jacobian), trading fresher weights for speed"
        )
