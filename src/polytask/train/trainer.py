"""The Trainer: a loop you can read top to bottom.

For each epoch: draw batches, compute every task's masked loss, let the balancer turn them into
``.grad``, clip, step the optimizer and the per-step schedule; then validate, log one line to
``metrics.jsonl``, write the ``last`` checkpoint (and ``best`` when the monitored metric
improved), and stop early when it has not improved for ``patience`` epochs.

The training step never synchronises with the host: running sums and non-finite flags stay on
the device and are read once per epoch (and, throttled, for the progress bar).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from polytask.balancing import Balancer, diagnostics
from polytask.data.batches import Batch
from polytask.data.preprocess import inputs_to
from polytask.errors import CheckpointError
from polytask.evaluate import TaskMetrics, evaluate
from polytask.models import MultiTaskModel
from polytask.runtime import Runtime
from polytask.runtime.interrupts import raise_if_stop_requested
from polytask.tasks import TaskSpec
from polytask.train import checkpoint
from polytask.train.cuda_graph import GraphedStep, check_graphable
from polytask.train.early_stopping import EarlyStopping
from polytask.train.fit import BatchSource, EpochCallback, FitResult
from polytask.train.meter import EpochMeter, micro_batches
from polytask.train.nonfinite import NonFiniteGuard
from polytask.train.progress import ProgressBar, note_update_every
from polytask.train.runlog import RunLog, epoch_record

__all__ = ["Batch", "BatchSource", "EpochCallback", "FitResult", "Trainer"]


class Trainer:
    """Trains a ``MultiTaskModel`` with a ``Balancer``; optionally keeps a run folder.

    Args:
        model, balancer, tasks: what to train and how losses become an update.
        optimizer, scheduler: the scheduler is stepped once per optimizer step.
        train_batches: a ``BatchSource``; ``val_batches``: a zero-argument callable returning
            an iterable of validation batches (or ``None`` for no validation).
        epochs: total epochs of the run (a resumed run continues to this number).
        runtime: device, processes, precision and compile (default: one process, ``auto``).
        run_dir: where ``metrics.jsonl``, ``curves.png`` and ``checkpoints/`` go (``None``: keep
            nothing on disk).
        grad_clip: max global gradient norm, or ``None``.
        early_stopping: the monitored quantity and patience.
        metadata: JSON-ready facts stored in every checkpoint (config, tasks, preprocessing).
        callbacks: called with each epoch's record after it is logged and checkpointed.
        accumulate_steps: batches (micro-batches) per optimizer step.
        nonfinite: a NaN or infinite task loss or gradient ends the run (``"stop"``) or its
            step is undone (``"skip"``); see ``polytask.train.nonfinite``.
        cuda_graph: capture the step in a CUDA graph and replay it (see
            ``polytask.train.cuda_graph``; checked when ``fit`` starts).
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
        runtime: Runtime | None = None,
        run_dir: Path | None = None,
        grad_clip: float | None = None,
        early_stopping: EarlyStopping | None = None,
        metadata: Mapping[str, Any] | None = None,
        callbacks: Sequence[EpochCallback] = (),
        progress: bool = True,
        description: str = "train",
        accumulate_steps: int = 1,
        nonfinite: str = "stop",
        cuda_graph: bool = False,
    ) -> None:
        self.model, self.balancer, self.tasks = model, balancer, list(tasks)
        self.optimizer, self.scheduler = optimizer, scheduler
        self.train_batches, self.val_batches = train_batches, val_batches
        self.epochs, self.grad_clip = epochs, grad_clip
        self.early_stopping = early_stopping or EarlyStopping()
        self.metadata, self.callbacks = dict(metadata or {}), list(callbacks)
        #: called with the epoch number before each epoch; one that returns True changed which
        #: parameters train (e.g. ``polytask.models.transfer.Unfreeze``)
        self.epoch_start_hooks: list[Callable[[int], bool]] = []
        self.description, self.accumulate_steps = description, accumulate_steps
        self.runtime = runtime or Runtime()
        self.device = self.runtime.device
        self.progress = progress and self.runtime.is_main  # rank 0 alone logs, plots and saves
        self.files = RunLog(run_dir, writes=self.runtime.is_main, metadata=self.metadata)
        self.epoch = self.step = 0
        self.runtime.setup(model, balancer, accumulate_steps=accumulate_steps)
        self.guard = NonFiniteGuard.for_runtime(nonfinite, self.tasks, self.runtime)
        if self.progress:
            note_update_every(balancer)
        self._shared = model.shared_parameters()
        self.diagnostics = diagnostics.GradientDiagnostics(balancer, self._shared)  # off: every=0
        self._params = [p for p in (*model.parameters(), *balancer.parameters()) if p.requires_grad]
        fixed = [t.weight for t in self.tasks]
        self._task_weights = (
            torch.tensor(fixed, device=self.device) if any(w != 1.0 for w in fixed) else None
        )
        self.nonfinite = nonfinite
        self.graph = GraphedStep(self._graph_body, optimizer, self._params) if cuda_graph else None
        if self.graph is not None:
            self._check_graphable()

    def _check_graphable(self) -> None:
        check_graphable(
            device=self.device,
            world_size=self.runtime.world_size,
            accumulate_steps=self.accumulate_steps,
            precision=self.runtime.precision.name,
            compiled=self.runtime.compile,
            nonfinite=self.nonfinite,
            diagnostics=self.diagnostics.every > 0,
            balancer=self.balancer,
            optimizer=self.optimizer,
        )

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the run exactly."""
        return {
            "format": checkpoint.CHECKPOINT_FORMAT,
            "epoch": self.epoch,
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self._optimizer_state(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "balancer": self.balancer.state_dict(),
            "early_stopping": self.early_stopping.state_dict(),
            "grad_scaler": self.runtime.state_dict(),
            "rng": checkpoint.capture_rng_state(),
            "metadata": self.metadata,
        }

    def _optimizer_state(self) -> dict[str, Any]:
        state = self.optimizer.state_dict()
        return self.graph.plain_state(state) if self.graph is not None else state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("format") != checkpoint.CHECKPOINT_FORMAT:
            raise CheckpointError(f"not a {checkpoint.CHECKPOINT_FORMAT} checkpoint")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.balancer.load_state_dict(state["balancer"])
        self.early_stopping.load_state_dict(state["early_stopping"])
        self.runtime.load_state_dict(state.get("grad_scaler"))
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        checkpoint.restore_rng_state(state["rng"])

    # ------------------------------------------------------------------ the loop
    def fit(self, *, resume: bool = False) -> FitResult:
        """Train until ``epochs`` or early stopping; with ``resume``, continue from the run
        folder's ``last`` checkpoint."""
        last = self.files.last_checkpoint
        if resume and last is not None:
            self.load_state_dict(checkpoint.load_checkpoint(last))
        self.files.start(resumed_at=self.epoch if resume else None)
        if self.graph is not None:
            self._check_graphable()  # again: diagnostics may have been switched on since
        self.model.to(self.device)
        self.balancer.to(self.device)
        history: list[dict[str, Any]] = []
        stopped_early = self.early_stopping.should_stop
        val_metrics: TaskMetrics = {}
        n = len(self.train_batches)
        with ProgressBar(
            self.tasks, self.description, total=self.epochs * n, enabled=self.progress
        ) as bar:
            bar.completed(self.epoch * n)
            while self.epoch < self.epochs and not stopped_early:
                self.epoch += 1
                started = time.perf_counter()
                train_record = self._train_epoch(bar)
                val_metrics = self._validate()
                improved = self.early_stopping.update_from(val_metrics, self.tasks, self.epoch)
                record = epoch_record(
                    epoch=self.epoch,
                    step=self.step,
                    lr=float(self.optimizer.param_groups[0]["lr"]),
                    seconds=time.perf_counter() - started,
                    train={**train_record, **self.diagnostics.end_epoch()},
                    val=val_metrics,
                    monitor=self.early_stopping.monitor(),
                    seen=getattr(self.train_batches, "seen_counts", None),
                )
                self.files.epoch(record, self.state_dict, best=improved)
                history.append(record)
                bar.epoch_done(record, self.epochs)
                stopped_early = self.early_stopping.should_stop
                for callback in self.callbacks:
                    callback(record)
        self.files.finish()
        self.runtime.barrier()  # every checkpoint is on disk before anyone reads it
        return FitResult(
            epochs_run=self.epoch,
            best_epoch=self.early_stopping.best_epoch,
            best_value=self.early_stopping.best,
            stopped_early=stopped_early and self.epoch < self.epochs,
            history=history,
            val_metrics=val_metrics,
        )

    def _train_epoch(self, bar: ProgressBar) -> dict[str, Any]:
        if any([hook(self.epoch) for hook in self.epoch_start_hooks]):  # re-read what trains
            self._shared[:] = self.model.shared_parameters()
            every = (*self.model.parameters(), *self.balancer.parameters())
            self._params[:] = [p for p in every if p.requires_grad]
            if self.graph is not None:
                self.graph.reset()
        self.model.train()
        self.train_batches.set_epoch(self.epoch)
        meter = EpochMeter(self.tasks, self.device)
        refresh_every = max(1, len(self.train_batches) // (20 * self.accumulate_steps))
        for group, wait in micro_batches(self.train_batches, self.accumulate_steps):
            raise_if_stop_requested()  # a SIGTERM a finalizer swallowed stops here
            meter.waited += wait
            meter.add(*self.train_step(group))
            if self.progress and meter.steps % refresh_every == 0:
                bar.advance(refresh_every * len(group), meter.running_means())
                self.guard.refresh(self.epoch)  # the bar synchronised: the flags are ready
        bar.completed(self.epoch * len(self.train_batches))
        return {**meter.summary(self.runtime.all_mean), **self.guard.end_epoch(self.epoch)}

    def _task_losses(self, x: Any, y: Mapping[str, Tensor]) -> tuple[Any, Tensor, Tensor]:
        with self.runtime.autocast():
            out = self.runtime.forward(inputs_to(x, self.device))
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
        if self.graph is not None and len(batches) == 1:
            (graph_losses, graph_present, graph_weights), grads = self.graph(*batches[0])
            self.guard.observe(graph_losses, grads, step=self.step + 1)
            self._count_step()
            return graph_losses, graph_present, graph_weights
        m = len(batches)
        factor = self.runtime.world_size * m
        total: Tensor | None = None
        present: Tensor | None = None
        if factor != 1:  # the step's global label counts, known before the first backward
            counts_per = [
                torch.stack([t.label_mask(y[t.name]).sum() for t in self.tasks]).to(self.device)
                for _, y in batches
            ]
            total = self.runtime.all_sum(torch.stack(counts_per).sum(dim=0))
            present = total > 0
        grad_scale = self.runtime.grad_scale(m)
        snapshot = self.guard.snapshot(self.optimizer, (self.model, self.balancer))
        self.optimizer.zero_grad(set_to_none=True)
        logged: Tensor | float = 0.0
        weights: Tensor | float = 0.0
        for i, (x, y) in enumerate(batches):
            # DDP syncs on the last micro-batch only, unless the balancer reduces by itself
            with self.runtime.no_sync(self.balancer.reduces_own_gradients or i < m - 1):
                losses, present, result_weights = self._backward(
                    x, y, total=total, present=present, grad_scale=grad_scale, micro_batches=m
                )
            if m == 1:
                logged, weights = losses.detach(), result_weights
            else:
                logged = logged + losses.detach() / m
                weights = weights + result_weights / m
        assert present is not None and isinstance(logged, Tensor) and isinstance(weights, Tensor)
        self.finish_step(snapshot, logged)
        return logged, present, weights

    def finish_step(self, snapshot: Any, logged: Tensor) -> None:
        """The end of every step, once ``.grad`` is written: clip, step the optimizer (unless
        the non-finite guard undoes the step; ``snapshot`` is its state before) and the
        schedule, count the step."""
        self.runtime.clip_gradients(self.optimizer, self._params, self.grad_clip)
        self.guard.optimizer_step(self.optimizer, snapshot, logged, self._params, self.step + 1)
        self._count_step()

    def _count_step(self) -> None:
        """Step the schedule (and the graph's device learning rates) and count the step."""
        if self.scheduler is not None:
            self.scheduler.step()
            if self.graph is not None:
                self.graph.sync_learning_rates()
        self.step += 1

    def _backward(
        self,
        x: Any,
        y: Mapping[str, Tensor],
        *,
        total: Tensor | None,
        present: Tensor | None,
        grad_scale: Tensor | float,
        micro_batches: int,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Forward and balanced backward of one micro-batch: (its task losses, as surrogates
        when ``total`` holds the step's global label counts; the present mask; the weights)."""
        out, losses, counts = self._task_losses(x, y)
        if total is not None:
            factor = self.runtime.world_size * micro_batches
            losses = losses * (counts.to(losses.dtype) * factor / total.clamp_min(1))
        else:  # one process, one batch: the batch's own counts
            present = counts > 0
        if self._task_weights is not None:
            losses = losses * self._task_weights
        result = self.diagnostics.at(self.step, micro_batches).backward(
            losses,
            shared_params=self._shared if self.balancer.needs_shared_params else None,
            features=out.features if self.balancer.needs_features else None,
            present=present,
            grad_scale=grad_scale,
        )
        assert present is not None
        return losses, present, result.weights.to(losses.dtype)

    def _graph_body(self, x: Any, y: Mapping[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """The whole step on one batch, device work only: what ``GraphedStep`` captures."""
        self.optimizer.zero_grad(set_to_none=True)
        losses, present, weights = self._backward(
            x, y, total=None, present=None, grad_scale=1.0, micro_batches=1
        )
        self.runtime.clip_gradients(self.optimizer, self._params, self.grad_clip)
        self.optimizer.step()
        return losses.detach(), present, weights

    def _validate(self) -> TaskMetrics:
        if self.val_batches is None:
            return {}
        batches, reducer = self.val_batches(), self.runtime.reducer
        return evaluate(self.model, batches, self.tasks, device=self.device, reducer=reducer)
