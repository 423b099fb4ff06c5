"""One run: build → fit → test. ``train_run`` never trains anything else (single-task baselines
and comparisons are experiments, in ``polytask.run.experiments``, which call it)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from polytask.config import RunConfig
from polytask.data.bundle import DataBundle
from polytask.errors import ConfigError
from polytask.evaluate import TaskMetrics, evaluate, monitor_problem
from polytask.models import MultiTaskModel
from polytask.models.transfer import Unfreeze
from polytask.privacy import PrivateTrainer, check_private_config
from polytask.run.build import (
    build_balancer_for,
    build_model_for,
    build_optimization,
    seed_everything,
)
from polytask.run.data import build_data, eval_batches, move_to_device, train_batches
from polytask.run.folder import RunFolder, run_metadata
from polytask.runtime import DistributedContext, Runtime, is_main_process
from polytask.runtime.device import resolve_device
from polytask.tasks import TaskSpec
from polytask.train.early_stopping import early_stopping_for
from polytask.train.trainer import EpochCallback, FitResult, Trainer


@dataclass
class RunResult:
    """A finished (or resumed-and-finished) run, and its experiment's baselines when asked."""

    run_dir: Path
    tasks: list[TaskSpec]
    test: TaskMetrics
    fit: FitResult | None = None
    baselines: TaskMetrics | None = None
    delta_m: float | None = None
    privacy: dict[str, Any] | None = None  # with train.privacy: the ε spent and the mechanism

    def to_json(self) -> dict[str, Any]:
        """What ``results.json`` holds."""
        data: dict[str, Any] = {"test": self.test}
        if self.fit is not None:
            data["best_epoch"] = self.fit.best_epoch
            data["epochs_run"] = self.fit.epochs_run
            data["stopped_early"] = self.fit.stopped_early
        if self.baselines is not None:
            data["baselines"] = self.baselines
            data["delta_m"] = self.delta_m
        if self.privacy is not None:
            data["privacy"] = self.privacy
        return data


def train_run(
    config: RunConfig,
    *,
    run_dir: Path | None = None,
    resume: bool = False,
    callbacks: Sequence[EpochCallback] = (),
    progress: bool | None = None,
    description: str | None = None,
    make_trainer: Callable[..., Trainer] | None = None,
) -> RunResult:
    """Train (or resume) the run ``config`` describes and evaluate its best checkpoint on the
    test split; rank 0 writes ``results.json``. ``make_trainer`` (``Trainer``'s signature)
    builds the trainer instead of ``Trainer`` (distillation, fine-tuning a pruned model)."""
    seed_everything(config.seed, deterministic=config.train.deterministic)
    runtime = Runtime.start(
        config.train.device, precision=config.train.precision, compile=config.train.compile
    )
    ctx = runtime.dist
    bundle = build_data(config)
    move_to_device(bundle, config, ctx.device)
    problem = monitor_problem(bundle.tasks, config.train.early_stopping.metric)
    if problem:
        raise ConfigError(f"train.early_stopping.metric: {problem}")
    if run_dir is None:  # rank 0 picks the free name; every process uses it
        run_dir = Path(ctx.broadcast(str(RunFolder.fresh(config).path) if ctx.is_main else None))
    folder = RunFolder(run_dir)
    if resume:
        folder.check_data(bundle, "last")
    metadata = run_metadata(config, bundle)
    model = build_model_for(config, bundle.tasks, bundle.input_shape)
    balancer = build_balancer_for(config, bundle.tasks)
    shown = config.train.progress if progress is None else progress
    trainer = _trainer(
        config, bundle, model, balancer, runtime, folder, metadata, progress=shown,
        make_trainer=make_trainer,
    )
    trainer.callbacks = list(callbacks)
    trainer.description = description or config.name
    if config.model.transfer.unfreeze_at_epoch is not None:  # linear probe, then fine-tuning
        trainer.epoch_start_hooks.append(Unfreeze(model, config.model.transfer.unfreeze_at_epoch))
    if config.balancing.diagnostics is not None:  # gradient-conflict diagnostics in metrics.jsonl
        trainer.diagnostics.every = config.balancing.diagnostics.every
    # everything above only reads: a bad setting fails before the folder exists
    with folder.session(None if resume else metadata, owner=ctx.is_main):
        fit = trainer.fit(resume=resume)
        if fit.best_epoch == 0:  # a value that is not finite is never the best
            raise ConfigError(
                f"train.early_stopping.metric: {config.train.early_stopping.metric} was NaN or "
                "infinite at every epoch, so no model is the best (the model diverged, or no "
                "validation sample is labelled for it: monitor another task's metric or 'loss')"
            )
        folder.load_weights(model, "best")
        test = _test_metrics(config, model, bundle, ctx)
        result = RunResult(run_dir=folder.path, tasks=bundle.tasks, test=test, fit=fit)
        if isinstance(trainer, PrivateTrainer):
            result.privacy = trainer.privacy_report()
        if ctx.is_main:
            folder.write_results(result.to_json())
    ctx.barrier()
    return result


def _trainer(
    config: RunConfig,
    bundle: DataBundle,
    model: MultiTaskModel,
    balancer: Any,
    runtime: Runtime,
    folder: RunFolder,
    metadata: dict[str, Any],
    *,
    progress: bool,
    make_trainer: Callable[..., Trainer] | None = None,
) -> Trainer:
    model.to(runtime.device)
    rank, world_size = runtime.rank, runtime.world_size
    private: dict[str, Any] = {}  # with train.privacy: a PrivateTrainer's own arguments
    if config.train.privacy is not None:
        check_private_config(config)
        private = {"method": config.balancing.method, "privacy": config.train.privacy}
        if config.train.cuda_graph:
            raise ConfigError("train.cuda_graph and train.privacy exclude each other")
    batches = train_batches(config, bundle, rank=rank, world_size=world_size)
    optimizer, scheduler = build_optimization(
        config,
        model,
        balancer,
        steps_per_epoch=-(-len(batches) // config.train.accumulate_steps),
    )
    es = config.train.early_stopping
    has_val = len(bundle.val) > 0
    graph: dict[str, Any] = {} if private else {"cuda_graph": config.train.cuda_graph}
    return (PrivateTrainer if private else make_trainer or Trainer)(
        model,
        balancer,
        bundle.tasks,
        optimizer=optimizer,
        scheduler=scheduler,
        train_batches=batches,
        val_batches=(lambda: eval_batches(config, bundle, "val", rank=rank, world_size=world_size))
        if has_val
        else None,
        epochs=config.train.epochs,
        runtime=runtime,
        run_dir=folder.path,
        grad_clip=config.train.grad_clip,
        early_stopping=early_stopping_for(
            bundle.tasks, es.metric, patience=es.patience, min_delta=es.min_delta
        ),
        metadata=metadata,
        progress=progress,
        accumulate_steps=config.train.accumulate_steps,
        nonfinite=config.train.nonfinite,
        **graph,
        **private,
    )


def _test_metrics(
    config: RunConfig,
    model: MultiTaskModel,
    bundle: DataBundle,
    ctx: DistributedContext | None = None,
) -> TaskMetrics:
    """Test metrics of ``model`` (with GAUC per ``evaluate.group_by``)."""
    rank, world = (ctx.rank, ctx.world_size) if ctx is not None else (0, 1)
    device = ctx.device if ctx is not None else next(model.parameters()).device
    test = evaluate(
        model,
        eval_batches(config, bundle, "test", rank=rank, world_size=world),
        bundle.tasks,
        device=device,
        reducer=ctx.reducer if ctx is not None else None,
    )
    _add_group_auc(config, model, bundle, test, device)
    return test


def _add_group_auc(
    config: RunConfig,
    model: MultiTaskModel,
    bundle: DataBundle,
    test: TaskMetrics,
    device: torch.device,
) -> None:
    """With ``evaluate.group_by``, add each binary task's GAUC over that column's groups to the
    test metrics (Zhou et al., KDD 2018)."""
    column = config.evaluate.group_by
    if column is None:
        return
    from polytask.evaluate.ranking import group_codes, ranking_report

    groups = group_codes(bundle, "test", column)
    report = ranking_report(model, bundle.test, bundle.tasks, groups, device=device)
    for task, values in report.items():
        if "gauc" in values:
            test[task]["gauc"] = values["gauc"]


def resume_run(run_dir: Path, *, progress: bool | None = None) -> RunResult:
    """Continue the run in ``run_dir`` from its last checkpoint to its configured epochs, with
    the edits of ``config.yaml`` that can be resumed (``RunFolder.resume_config``)."""
    folder = RunFolder(run_dir)
    config, changes = folder.resume_config()
    if changes and is_main_process():
        Console(stderr=True).print(
            f"resuming {folder.path} with the edited config.yaml: " + "; ".join(changes),
            highlight=False,
            soft_wrap=True,
        )
    return train_run(config, run_dir=folder.path, resume=True, progress=progress)


def evaluate_run(run_dir: Path) -> RunResult:
    """Re-evaluate a run folder's best model on its test split."""
    folder = RunFolder(run_dir)
    trained = folder.load_trained()
    config = trained.config
    seed_everything(config.seed, deterministic=config.train.deterministic)
    bundle = build_data(config)
    folder.check_data(bundle, "best")
    trained.model.to(resolve_device(config.train.device))
    test = _test_metrics(config, trained.model, bundle)
    return RunResult(run_dir=folder.path, tasks=trained.tasks, test=test)
