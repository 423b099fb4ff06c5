"""The Trainer: a loop you can read top to bottom.

For each epoch: draw batches, compute every task's masked loss, let the balancer turn them into
``.grad``, clip, step the optimizer and the per-step schedule; then validate, log one line to
``metrics.jsonl``, write the ``last`` checkpoint (and ``best`` when the monitored metric
improved), and stop early when it has not improved for ``patience`` epochs.

The training step never synchronises with the host: running sums stay on the device and are read
once per epoch (and, throttled, for the progress bar).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from polytask.balancing import Balancer
from polytask.data.preprocess import Inputs, inputs_to
from polytask.errors import CheckpointError, ConfigError
from polytask.evaluate import TaskMetrics, evaluate, monitor_higher_is_better, monitor_value
from polytask.models import MultiTaskModel
from polytask.tasks import TaskSpec
from polytask.train.checkpoint import (
    capture_rng_state,
    copy_checkpoint,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from polytask.train.distributed import DistributedContext
from polytask.train.runlog import MetricsLog, plot_curves, read_metrics, truncate_after

Batch = tuple[Inputs, dict[str, Tensor]]
CHECKPOINT_FORMAT = "polytask-checkpoint/1"


class BatchSource(Protocol):
    """What the Trainer draws training batches from (e.g. ``BatchLoader``)."""

    def set_epoch(self, epoch: int) -> None: ...
    def __len__(self) -> int: ...
    def __iter__(self) -> Iterator[Batch]: ...


@dataclass
class EarlyStopping:
    """Tracks the best value of the monitored quantity and the epochs since it improved."""

    metric: str = "loss"
    higher_is_better: bool = False
    patience: int | None = None
    min_delta: float = 0.0
    best: float = math.nan
    best_epoch: int = 0
    bad_epochs: int = 0

    def update(self, value: float, epoch: int) -> bool:
        """Record ``value`` at ``epoch``; True when it is the best so far."""
        if math.isnan(value):
            improved = math.isnan(self.best)
        elif math.isnan(self.best):
            improved = True
        elif self.higher_is_better:
            improved = value > self.best + self.min_delta
        else:
            improved = value < self.best - self.min_delta
        if improved:
            self.best, self.best_epoch, self.bad_epochs = value, epoch, 0
        else:
            self.bad_epochs += 1
        return improved

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.bad_epochs >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.best = float(state["best"])
        self.best_epoch = int(state["best_epoch"])
        self.bad_epochs = int(state["bad_epochs"])


@dataclass
class FitResult:
    """What ``Trainer.fit`` did."""

    epochs_run: int
    best_epoch: int
    best_value: float
    stopped_early: bool
    history: list[dict[str, Any]] = field(default_factory=list)
    val_metrics: TaskMetrics = field(default_factory=dict)


EpochCallback = Callable[[dict[str, Any]], None]


class Trainer:
    """Trains a ``MultiTaskModel`` with a ``Balancer``; optionally keeps a run folder.

    Args:
        model, balancer, tasks: what to train and how losses become an update.
        optimizer, scheduler: the scheduler is stepped once per optimizer step.
        train_batches: a ``BatchSource``; ``val_batches``: a zero-argument callable returning
            an iterable of validation batches (or ``None`` for no validation).
        epochs: total epochs of the run (a resumed run continues to this number).
        device: where the model lives; batches are moved there.
        run_dir: where ``metrics.jsonl``, ``curves.png`` and ``checkpoints/`` go (``None``: keep
            nothing on disk).
        grad_clip: max global gradient norm, or ``None``.
        early_stopping: the monitored quantity and patience.
        metadata: JSON-ready facts stored in every checkpoint (config, tasks, preprocessing).
        callbacks: called with each epoch's record after it is logged and checkpointed.
    """

    def __init__(
        self,
        model: MultiTaskModel,
        balancer: Balancer,
        tasks: Sequence[TaskSpec],
        *,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None,
        train_batches: BatchSource,
        val_batches: Callable[[], Iterable[Batch]] | None,
        epochs: int,
        device: torch.device,
        run_dir: Path | None = None,
        grad_clip: float | None = None,
        early_stopping: EarlyStopping | None = None,
        metadata: Mapping[str, Any] | None = None,
        callbacks: Sequence[EpochCallback] = (),
        progress: bool = True,
        description: str = "train",
        distributed: DistributedContext | None = None,
        precision: str = "fp32",
        accumulate_steps: int = 1,
        compile: bool = False,
    ) -> None:
        self.model = model
        self.balancer = balancer
        self.tasks = list(tasks)
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.train_batches = train_batches
        self.val_batches = val_batches
        self.epochs = epochs
        self.device = device
        self.run_dir = run_dir
        self.grad_clip = grad_clip
        self.early_stopping = early_stopping or EarlyStopping()
        self.metadata = dict(metadata or {})
        self.callbacks = list(callbacks)
        self.progress = progress
        self.description = description
        self.console = Console(stderr=True)
        self.epoch = 0
        self.step = 0
        self.dist = distributed or DistributedContext(device=device)
        if not self.dist.is_main:  # rank 0 alone logs, plots and writes checkpoints
            self.progress = False
        if precision not in ("fp32", "bf16", "fp16"):
            raise ConfigError(f"train.precision: unknown {precision!r}; valid: fp32, bf16, fp16")
        if precision == "fp16" and device.type != "cuda":
            raise ConfigError("train.precision: fp16 needs CUDA (use bf16 on CPU)")
        if accumulate_steps < 1:
            raise ConfigError(f"train.accumulate_steps must be >= 1, found {accumulate_steps}")
        self.accumulate_steps = accumulate_steps
        self._amp = precision != "fp32"
        self._amp_dtype = torch.float16 if precision == "fp16" else torch.bfloat16
        self.scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
        if self.scaler is not None or accumulate_steps > 1:
            balancer.set_grad_scale(0.5)  # fails early for methods that cannot scale gradients
            balancer.set_grad_scale(1.0)
        balancer.attach(model)
        update_every = getattr(balancer, "update_every", 1)
        if update_every > 1 and self.dist.is_main and progress:
            self.console.print(
                f"{type(balancer).__name__}: weights recomputed every {update_every} steps; the "
                f"{update_every - 1} steps between reuse them with one ordinary backward (no "
                "per-task Jacobian), trading fresher weights for speed"
            )
        self.train_model: torch.nn.Module = model
        if self.dist.enabled:
            balancer.distribute(self.dist.reducer)
            model.to(device)
            self.train_model = DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None
            )
        if compile and (balancer.needs_shared_params or balancer.needs_features):
            self.console.print(
                "[yellow]warning:[/] torch.compile is not used with "
                f"{type(balancer).__name__}: its per-task backward (vmap over the autograd "
                "graph) does not run through compiled graphs; training eagerly"
            )
            compile = False
        self._compiled: Any = torch.compile(self.train_model) if compile else None
        self._shared = model.shared_parameters()
        self._params = [p for p in model.parameters() if p.requires_grad]
        self._params += [p for p in balancer.parameters() if p.requires_grad]
        fixed = [t.weight for t in self.tasks]
        self._task_weights = (
            torch.tensor(fixed, device=device) if any(w != 1.0 for w in fixed) else None
        )

    # ------------------------------------------------------------------ files
    @property
    def checkpoint_dir(self) -> Path | None:
        return self.run_dir / "checkpoints" if self.run_dir is not None else None

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the run exactly."""
        return {
            "format": CHECKPOINT_FORMAT,
            "epoch": self.epoch,
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "balancer": self.balancer.state_dict(),
            "early_stopping": self.early_stopping.state_dict(),
            "grad_scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": capture_rng_state(),
            "metadata": self.metadata,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"not a {CHECKPOINT_FORMAT} checkpoint")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.balancer.load_state_dict(state["balancer"])
        self.early_stopping.load_state_dict(state["early_stopping"])
        if self.scaler is not None and state.get("grad_scaler"):
            self.scaler.load_state_dict(state["grad_scaler"])
        self.epoch = int(state["epoch"])
        self.step = int(state["step"])
        restore_rng_state(state["rng"])

    def _save(self, improved: bool) -> None:
        directory = self.checkpoint_dir
        if directory is None or not self.dist.is_main:
            return
        directory.mkdir(parents=True, exist_ok=True)
        last = directory / "last.safetensors"
        save_checkpoint(last, self.state_dict())
        if improved:
            copy_checkpoint(last, directory / "best.safetensors")

    # ------------------------------------------------------------------ the loop
    def fit(self, *, resume: bool = False) -> FitResult:
        """Train until ``epochs`` or early stopping; with ``resume``, continue from the run
        folder's ``last`` checkpoint."""
        log = None
        if self.run_dir is not None:
            metrics_path = self.run_dir / "metrics.jsonl"
            if resume:
                last = self.run_dir / "checkpoints" / "last.safetensors"
                self.load_state_dict(load_checkpoint(last))
            if self.dist.is_main:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                if resume or metrics_path.exists():  # a fresh run in a reused folder: fresh log
                    truncate_after(metrics_path, self.epoch if resume else 0)
                log = MetricsLog(metrics_path)
        self.model.to(self.device)
        self.balancer.to(self.device)
        history: list[dict[str, Any]] = []
        stopped_early = self.early_stopping.should_stop
        val_metrics: TaskMetrics = {}
        with self._progress_bar() as bar:
            task_id = bar.add_task(
                self.description, total=self.epochs * len(self.train_batches), losses=""
            )
            bar.update(task_id, completed=self.epoch * len(self.train_batches))
            while self.epoch < self.epochs and not stopped_early:
                self.epoch += 1
                started = time.perf_counter()
                train_record = self._train_epoch(bar, task_id)
                val_metrics = self._validate()
                improved = self._track(val_metrics)
                record = {
                    "epoch": self.epoch,
                    "step": self.step,
                    "lr": self.optimizer.param_groups[0]["lr"],
                    "time_s": round(time.perf_counter() - started, 4),
                    **train_record,
                    "val": val_metrics,
                    "monitor": {
                        "metric": self.early_stopping.metric,
                        "best": self.early_stopping.best,
                        "best_epoch": self.early_stopping.best_epoch,
                    },
                }
                seen = getattr(self.train_batches, "seen_counts", None)
                if callable(seen):  # labelled samples per task drawn this epoch (issue 5)
                    record["seen"] = seen()
                if log is not None:
                    log.append(record)
                self._save(improved)
                history.append(record)
                self._report(bar, record)
                stopped_early = self.early_stopping.should_stop
                for callback in self.callbacks:
                    callback(record)
        if self.run_dir is not None and self.dist.is_main:
            plot_curves(read_metrics(self.run_dir / "metrics.jsonl"), self.run_dir / "curves.png")
        self.dist.barrier()  # every checkpoint is on disk before anyone reads it
        return FitResult(
            epochs_run=self.epoch,
            best_epoch=self.early_stopping.best_epoch,
            best_value=self.early_stopping.best,
            stopped_early=stopped_early and self.epoch < self.epochs,
            history=history,
            val_metrics=val_metrics,
        )

    def _micro_batches(self) -> Iterator[tuple[list[Batch], float]]:
        """Groups of ``accumulate_steps`` batches, and the seconds spent waiting for them."""
        iterator = iter(self.train_batches)
        while True:
            group: list[Batch] = []
            started = time.perf_counter()
            for batch in iterator:
                group.append(batch)
                if len(group) == self.accumulate_steps:
                    break
            if not group:
                return
            yield group, time.perf_counter() - started

    def _train_epoch(self, bar: Progress, task_id: Any) -> dict[str, Any]:
        self.model.train()
        self.train_batches.set_epoch(self.epoch)
        k = len(self.tasks)
        loss_sum = torch.zeros(k, device=self.device)
        present_steps = torch.zeros(k, device=self.device)
        weight_sum = torch.zeros(k, device=self.device)
        steps = 0
        waited = 0.0
        started = time.perf_counter()
        total_batches = len(self.train_batches)
        refresh_every = max(1, total_batches // (20 * self.accumulate_steps))
        for group, wait in self._micro_batches():
            waited += wait
            losses, present, weights = self.train_step(group)
            loss_sum += torch.where(present, losses.detach(), torch.zeros_like(losses))
            present_steps += present
            weight_sum += weights
            steps += 1
            if self.progress and steps % refresh_every == 0:
                mean = (loss_sum / present_steps.clamp_min(1)).tolist()
                text = "  ".join(f"{t.name} {v:.3f}" for t, v in zip(self.tasks, mean, strict=True))
                bar.update(task_id, advance=refresh_every * len(group), losses=text)
        if self.progress:
            bar.update(task_id, completed=self.epoch * total_batches)
        if self.dist.reducer is not None:  # the surrogates average to the global losses
            loss_sum = self.dist.reducer.mean(loss_sum)
        means = (loss_sum / present_steps.clamp_min(1)).tolist()
        present_counts = present_steps.tolist()
        weights_mean = (weight_sum / max(steps, 1)).tolist()
        elapsed = time.perf_counter() - started
        train = {
            t.name: {
                "loss": means[i] if present_counts[i] > 0 else math.nan,
                "absent_steps": steps - int(present_counts[i]),
            }
            for i, t in enumerate(self.tasks)
        }
        return {
            "train": train,
            "weights": {t.name: weights_mean[i] for i, t in enumerate(self.tasks)},
            "data_wait_fraction": round(waited / elapsed, 5) if elapsed > 0 else 0.0,
            "train_time_s": round(elapsed, 4),
        }

    def _forward(self, x: Any) -> Any:
        """The model's forward, compiled when asked; an unsupported compile falls back to eager
        once, with a warning."""
        if self._compiled is not None:
            try:
                return self._compiled(x)
            except Exception as exc:  # torch.compile unsupported here: fall back, once
                self.console.print(
                    f"[yellow]warning:[/] torch.compile failed ({type(exc).__name__}: "
                    f"{' '.join(str(exc).split())[:160]}); training without compilation"
                )
                self._compiled = None
        return self.train_model(x)

    def _task_losses(self, x: Any, y: Mapping[str, Tensor]) -> tuple[Any, Tensor, Tensor]:
        amp = (
            torch.autocast(self.device.type, dtype=self._amp_dtype) if self._amp else nullcontext()
        )
        with amp:
            out = self._forward(inputs_to(x, self.device))
            pairs = [
                t.compute_loss(
                    out.outputs[t.name].float(), y[t.name].to(self.device, non_blocking=True)
                )
                for t in self.tasks
            ]
        losses = torch.stack([loss for loss, _ in pairs])
        counts = torch.stack([count for _, count in pairs])
        return out, losses, counts

    def train_step(self, batches: Sequence[Batch]) -> tuple[Tensor, Tensor, Tensor]:
        """One optimizer step over one batch or several accumulated micro-batches; returns
        (task losses, present mask, balancer weights), all on the device, without host sync.

        Each micro-batch's loss is replaced by a surrogate ``S_k · N · M / C_k`` (its sum of
        per-sample losses, times the number of processes N and of micro-batches M, over the
        global count C_k of labelled samples of the step), and the balancer scales the gradients
        it writes by ``1/M`` (times the fp16 loss scale): the accumulated, all-reduced gradient is
        the gradient of the mean loss over every labelled sample of the step.
        """
        m = len(batches)
        factor = self.dist.world_size * m
        total: Tensor | None = None
        present: Tensor | None = None
        if factor != 1:  # the step's global label counts, known before the first backward
            counts_per = [
                torch.stack([t.label_mask(y[t.name]).sum() for t in self.tasks]).to(self.device)
                for _, y in batches
            ]
            total = torch.stack(counts_per).sum(dim=0)
            if self.dist.reducer is not None:
                total = self.dist.reducer.sum(total)
            present = total > 0
        scale: Tensor | float = 1.0 / m
        if self.scaler is not None:
            scale = self.scaler.scale(torch.ones((), device=self.device)) / m
        self.balancer.set_grad_scale(scale)
        self.optimizer.zero_grad(set_to_none=True)
        logged: Tensor | float = 0.0
        weights: Tensor | float = 0.0
        for i, (x, y) in enumerate(batches):
            last = i == m - 1
            sync = self.dist.enabled and (self.balancer.reduces_own_gradients or not last)
            with self.train_model.no_sync() if sync else nullcontext():  # type: ignore[operator]
                out, losses, counts = self._task_losses(x, y)
                if total is not None:
                    losses = losses * (counts.to(losses.dtype) * factor / total.clamp_min(1))
                else:  # one process, one batch: the batch's own counts
                    present = counts > 0
                if self._task_weights is not None:
                    losses = losses * self._task_weights
                result = self.balancer.backward(
                    losses,
                    shared_params=self._shared if self.balancer.needs_shared_params else None,
                    features=out.features if self.balancer.needs_features else None,
                    present=present,
                )
            if m == 1:
                logged, weights = losses.detach(), result.weights.to(losses.dtype)
            else:
                logged = logged + losses.detach() / m
                weights = weights + result.weights.to(losses.dtype) / m
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self._params, self.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.step += 1
        assert present is not None and isinstance(logged, Tensor) and isinstance(weights, Tensor)
        return logged, present, weights

    def _validate(self) -> TaskMetrics:
        if self.val_batches is None:
            return {}
        return evaluate(
            self.model,
            self.val_batches(),
            self.tasks,
            device=self.device,
            reducer=self.dist.reducer,
        )

    def _track(self, val_metrics: TaskMetrics) -> bool:
        if not val_metrics:  # no validation split: the latest epoch is the best
            return self.early_stopping.update(-float(self.epoch), self.epoch)
        value = monitor_value(val_metrics, self.tasks, self.early_stopping.metric)
        return self.early_stopping.update(value, self.epoch)

    # ------------------------------------------------------------------ display
    def _progress_bar(self) -> Progress:
        return Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[losses]}"),
            console=self.console,
            disable=not self.progress,
            transient=False,
        )

    def _report(self, bar: Progress, record: Mapping[str, Any]) -> None:
        if not self.progress:
            return
        parts = [f"epoch {record['epoch']}/{self.epochs}"]
        for task in self.tasks:
            metric = task.metric_names[0]
            value = record["val"].get(task.name, {}).get(metric)
            loss = record["train"][task.name]["loss"]
            shown = f"val {metric} {value:.4f}" if value == value and value is not None else ""
            parts.append(f"{task.name}: loss {loss:.4f} {shown}".rstrip())
        parts.append(f"{record['time_s']:.1f}s")
        bar.console.print(" · ".join(parts), highlight=False, soft_wrap=True)


def early_stopping_for(
    tasks: Sequence[TaskSpec], metric: str, *, patience: int | None, min_delta: float = 0.0
) -> EarlyStopping:
    """An ``EarlyStopping`` whose direction follows the monitored metric."""
    return EarlyStopping(
        metric=metric,
        higher_is_better=monitor_higher_is_better(tasks, metric),
        patience=patience,
        min_delta=min_delta,
    )
