"""From a validated ``RunConfig`` to a trained, evaluated run folder — and back.

A run folder holds ``config.yaml`` (the resolved configuration), ``run.json`` (tasks with their
fitted target scales, input shape, feature names, input standardisation), ``metrics.jsonl``,
``curves.png``, ``checkpoints/{best,last}.safetensors``, ``results.json`` and, with baselines,
``baselines/<task>/`` (one single-task run per task, reused when its configuration is unchanged).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from polytask import __version__
from polytask.balancing import Balancer, build_balancer
from polytask.config import RunConfig, config_to_dict, load_config, parse_config
from polytask.data.mixing import build_datasets_bundle, mixer_from_bundle  # issue 5
from polytask.data.multilabel import BatchLoader, DataBundle, apply_preprocessors, build_bundle
from polytask.data.preprocess import Inputs, Preprocessor, preprocessor_from_dict
from polytask.data.sources import DATASETS
from polytask.errors import CheckpointError, ConfigError, DataError
from polytask.evaluate import TaskMetrics, delta_m, evaluate, monitor_problem
from polytask.models import MultiTaskModel, build_model
from polytask.tasks import TaskSpec, class_balanced_weights
from polytask.train.checkpoint import load_checkpoint
from polytask.train.device import resolve_device
from polytask.train.distributed import DistributedContext, init_distributed
from polytask.train.optim import build_optimizer, build_scheduler
from polytask.train.trainer import EpochCallback, FitResult, Trainer, early_stopping_for


@dataclass
class RunResult:
    """A finished (or resumed-and-finished) run."""

    run_dir: Path
    tasks: list[TaskSpec]
    test: TaskMetrics
    fit: FitResult | None = None
    baselines: TaskMetrics | None = None
    delta_m: float | None = None


def seed_everything(seed: int, *, deterministic: bool = True) -> None:
    """Seed Python, NumPy and torch; make CPU kernels deterministic."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(deterministic, warn_only=True)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------- data
def build_data(config: RunConfig) -> DataBundle:
    """The run's dataset, restricted to ``data.tasks`` when given, split and standardised."""
    if config.data.datasets is not None:  # several datasets, one model (issue 5)
        bundle = build_datasets_bundle(
            [entry.model_dump() for entry in config.data.datasets],
            seed=config.seed,
            tasks=config.data.tasks,
            val_fraction=config.data.val_fraction,
            test_fraction=config.data.test_fraction,
            standardize=config.data.standardize,
        )
        apply_task_options(bundle, config)
        return bundle
    assert config.data.dataset is not None  # the config has `dataset` or `datasets` (issue 5)
    table = DATASETS.get(config.data.dataset)(seed=config.seed, **config.data.params)
    if config.data.tasks is not None:
        known = [t.name for t in table.tasks]
        unknown = [n for n in config.data.tasks if n not in known]
        if unknown:
            raise ConfigError(
                f"data.tasks: unknown task(s) {', '.join(unknown)} for dataset "
                f"{config.data.dataset!r}; known: {', '.join(known)}"
            )
        table.tasks = [t for t in table.tasks if t.name in config.data.tasks]
        table.targets = {n: table.targets[n] for n in config.data.tasks}
    bundle = build_bundle(
        table,
        val_fraction=config.data.val_fraction,
        test_fraction=config.data.test_fraction,
        seed=config.seed,
        standardize=config.data.standardize,
    )
    apply_task_options(bundle, config)
    return bundle


def apply_task_options(bundle: DataBundle, config: RunConfig) -> None:
    """Fixed task weights and class-balanced losses from ``data.task_weights`` and
    ``data.class_balance`` (class counts from the training split only)."""
    weights, balance = config.data.task_weights, config.data.class_balance
    names = [t.name for t in bundle.tasks]
    for field_name, mapping in (("data.task_weights", weights), ("data.class_balance", balance)):
        unknown = [n for n in mapping if n not in names]
        if unknown:
            raise ConfigError(
                f"{field_name}: unknown task(s) {', '.join(unknown)}; tasks: {', '.join(names)}"
            )
    for name, weight in weights.items():
        if not weight >= 0:
            raise ConfigError(f"data.task_weights.{name}: must be >= 0, found {weight}")
    tasks = []
    for task in bundle.tasks:
        if task.name in weights:
            task = replace(task, weight=float(weights[task.name]))
        if task.name in balance:
            y = bundle.train.targets[task.name]
            if task.kind == "multiclass":
                counts = torch.bincount(y[y >= 0], minlength=task.num_classes).tolist()
            elif task.kind == "binary":
                labelled = y[torch.isfinite(y)]
                counts = [int((labelled < 0.5).sum()), int((labelled >= 0.5).sum())]
            else:
                raise ConfigError(
                    f"data.class_balance.{task.name}: applies to binary and multiclass tasks, "
                    f"not {task.kind}"
                )
            weights_c = class_balanced_weights(counts, method=balance[task.name])
            task = replace(task, class_weights=weights_c)
        tasks.append(task)
    bundle.tasks = tasks


def eval_batches(
    bundle: DataBundle, split: str, batch_size: int, ctx: DistributedContext | None = None
) -> BatchLoader:
    """Batches of one split in order; under data parallelism, this process's share."""
    rank, world = (ctx.rank, ctx.world_size) if ctx is not None else (0, 1)
    return BatchLoader(getattr(bundle, split), batch_size, rank=rank, world_size=world)


# ---------------------------------------------------------------------------------- model
def build_run_model(config: RunConfig, tasks: Sequence[TaskSpec], input_shape: Any):
    """The model and balancer a configuration describes (before any training)."""
    model = build_model(
        tasks,
        input_shape,
        encoder=config.model.encoder,
        encoder_params=config.model.encoder_params,
        head=config.model.head,
        head_params=config.model.head_params,
        architecture=config.model.architecture,
        architecture_params=config.model.architecture_params,
    )
    balancer: Balancer = build_balancer(
        config.balancing.method,
        tasks,
        params=config.balancing.params,
        log_losses=config.balancing.log_losses,
    )
    return model, balancer


def run_metadata(config: RunConfig, bundle: DataBundle) -> dict[str, Any]:
    """What a run folder (and each checkpoint) says about itself."""
    return {
        "polytask_version": __version__,
        "config": config_to_dict(config),
        "tasks": [t.to_dict() for t in bundle.tasks],
        "input_shape": bundle.input_shape
        if isinstance(bundle.input_shape, dict)
        else list(bundle.input_shape),
        "feature_names": bundle.feature_names,
        "categorical_names": bundle.categorical_names,
        "preprocessors": {k: p.to_dict() for k, p in bundle.preprocessors.items()},
        "data": bundle.info,
    }


def new_run_dir(config: RunConfig) -> Path:
    """``output_dir/name``, or ``name-2``, ``name-3``... so no earlier run is overwritten."""
    base = Path(config.output_dir) / config.name
    candidate, n = base, 1
    while candidate.exists():
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate


# ---------------------------------------------------------------------------------- training
def train_from_config(
    config: RunConfig,
    *,
    run_dir: Path | None = None,
    resume: bool = False,
    callbacks: Sequence[EpochCallback] = (),
    progress: bool | None = None,
    description: str | None = None,
    baselines: bool | None = None,
) -> RunResult:
    """Train (or resume) the run ``config`` describes, evaluate it on the test split and, when
    baselines are asked for, train the single-task baselines and compute Δm%."""
    seed_everything(config.seed, deterministic=config.train.deterministic)
    ctx = init_distributed(config.train.device)
    device = ctx.device
    bundle = build_data(config)
    if config.data.on_device and device.type != "cpu":
        bundle.train, bundle.val, bundle.test = (
            bundle.train.to(device),
            bundle.val.to(device),
            bundle.test.to(device),
        )
    tasks = bundle.tasks
    problem = monitor_problem(tasks, config.train.early_stopping.metric)
    if problem:
        raise ConfigError(f"train.early_stopping.metric: {problem}")
    if run_dir is None:  # rank 0 picks the free name; every process uses it
        run_dir = Path(ctx.broadcast(str(new_run_dir(config)) if ctx.is_main else None))
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    metadata = run_metadata(config, bundle)
    if not resume and ctx.is_main:
        write_text_atomic(
            run_dir / "config.yaml", yaml.safe_dump(metadata["config"], sort_keys=False)
        )
        write_text_atomic(run_dir / "run.json", json.dumps(metadata, indent=2))

    model, balancer = build_run_model(config, tasks, bundle.input_shape)
    model.to(device)
    optimizer = build_optimizer(
        [*model.parameters(), *balancer.parameters()],
        name=config.optimizer.name,
        lr=config.optimizer.lr,
        weight_decay=config.optimizer.weight_decay,
        momentum=config.optimizer.momentum,
        betas=config.optimizer.betas,
    )
    train_batches = BatchLoader(
        bundle.train,
        config.data.batch_size,
        shuffle=True,
        seed=config.seed,
        rank=ctx.rank,
        world_size=ctx.world_size,
    )
    if config.data.datasets is not None:  # several datasets (issue 5): drawn by the sampler
        train_batches = mixer_from_bundle(  # type: ignore[assignment]
            bundle,
            config.data.batch_size,
            sampler=config.data.sampler.name,
            sampler_params=config.data.sampler.params,
            batch_mode=config.data.batch_mode,
            epoch=config.data.epoch,
            total_epochs=config.train.epochs,
            seed=config.seed,
            rank=ctx.rank,
            world_size=ctx.world_size,
        )
    steps_per_epoch = -(-len(train_batches) // config.train.accumulate_steps)
    scheduler = build_scheduler(
        optimizer,
        name=config.schedule.name,
        warmup_steps=round(config.schedule.warmup_epochs * steps_per_epoch),
        total_steps=config.train.epochs * steps_per_epoch,
        min_lr_ratio=config.schedule.min_lr_ratio,
    )
    has_val = len(bundle.val) > 0
    es = config.train.early_stopping
    trainer = Trainer(
        model,
        balancer,
        tasks,
        optimizer=optimizer,
        scheduler=scheduler,
        train_batches=train_batches,
        val_batches=(lambda: eval_batches(bundle, "val", config.data.eval_batch_size, ctx))
        if has_val
        else None,
        epochs=config.train.epochs,
        device=device,
        run_dir=run_dir,
        grad_clip=config.train.grad_clip,
        early_stopping=early_stopping_for(
            tasks, es.metric, patience=es.patience, min_delta=es.min_delta
        ),
        metadata=metadata,
        callbacks=callbacks,
        progress=config.train.progress if progress is None else progress,
        description=description or config.name,
        distributed=ctx,
        precision=config.train.precision,
        accumulate_steps=config.train.accumulate_steps,
        compile=config.train.compile,
    )
    fit = trainer.fit(resume=resume)
    load_weights(model, run_dir / "checkpoints" / "best.safetensors")
    test = evaluate(
        model,
        eval_batches(bundle, "test", config.data.eval_batch_size, ctx),
        tasks,
        device=device,
        reducer=ctx.reducer,
    )
    add_group_auc(config, model, bundle, tasks, test, device)
    result = RunResult(run_dir=run_dir, tasks=tasks, test=test, fit=fit)
    if config.evaluate.baselines if baselines is None else baselines:
        result.baselines = train_baselines(config, run_dir, tasks, progress=progress)
        result.delta_m = delta_m(test, result.baselines, tasks)
    if ctx.is_main:
        save_results(result)
    ctx.barrier()
    return result


def add_group_auc(
    config: RunConfig,
    model: MultiTaskModel,
    bundle: DataBundle,
    tasks: Sequence[TaskSpec],
    test: TaskMetrics,
    device: torch.device,
) -> None:
    """With ``evaluate.group_by``, add each binary task's GAUC over that column's groups to the
    test metrics (Zhou et al., KDD 2018)."""
    column = config.evaluate.group_by
    if column is None:
        return
    from polytask.ranking import group_codes, ranking_report

    groups = group_codes(bundle, "test", column)
    report = ranking_report(model, bundle.test, tasks, groups, device=device)
    for task, values in report.items():
        if "gauc" in values:
            test[task]["gauc"] = values["gauc"]


def save_results(result: RunResult) -> None:
    data: dict[str, Any] = {"test": result.test}
    if result.fit is not None:
        data["best_epoch"] = result.fit.best_epoch
        data["epochs_run"] = result.fit.epochs_run
        data["stopped_early"] = result.fit.stopped_early
    if result.baselines is not None:
        data["baselines"] = result.baselines
        data["delta_m"] = result.delta_m
    write_text_atomic(result.run_dir / "results.json", json.dumps(data, indent=2, allow_nan=True))


def baseline_config(config: RunConfig, task: str) -> RunConfig:
    """The single-task configuration of ``task``: the same data, model and optimisation with only
    that task (balancing is moot with one task: equal weighting)."""
    raw = config_to_dict(config)
    raw["name"] = task
    raw["data"]["tasks"] = [task]
    for key in ("task_weights", "class_balance"):  # only this task's options apply
        raw["data"][key] = {k: v for k, v in raw["data"].get(key, {}).items() if k == task}
    raw["balancing"] = {"method": "equal", "params": {}}
    raw["evaluate"] = {"baselines": False}
    metric = raw["train"]["early_stopping"]["metric"]
    if metric != "loss" and not metric.startswith(f"{task}/"):
        raw["train"]["early_stopping"]["metric"] = "loss"
    return parse_config(raw, source=f"baseline {task}")


def _fingerprint(config: RunConfig) -> str:
    raw = config_to_dict(config)
    for key in ("name", "output_dir"):
        raw.pop(key)
    raw["train"].pop("progress", None)
    return hashlib.sha256(json.dumps(raw, sort_keys=True).encode()).hexdigest()[:16]


def train_baselines(
    config: RunConfig, run_dir: Path, tasks: Sequence[TaskSpec], *, progress: bool | None = None
) -> TaskMetrics:
    """Each task's test metrics from a single-task model, trained once and cached in
    ``run_dir/baselines/<task>/``."""
    results: TaskMetrics = {}
    for task in tasks:
        single = baseline_config(config, task.name)
        folder = run_dir / "baselines" / task.name
        cache = folder / "results.json"
        fingerprint = _fingerprint(single)
        if cache.is_file():
            cached = json.loads(cache.read_text())
            if cached.get("fingerprint") == fingerprint:
                results[task.name] = cached["test"][task.name]
                continue
        outcome = train_from_config(
            single,
            run_dir=folder,
            progress=progress,
            description=f"single-task {task.name}",
            baselines=False,
        )
        if int(os.environ.get("RANK", "0")) != 0:  # rank 0 alone writes the cache
            results[task.name] = outcome.test[task.name]
            continue
        saved = json.loads(cache.read_text())
        saved["fingerprint"] = fingerprint
        write_text_atomic(cache, json.dumps(saved, indent=2))
        results[task.name] = outcome.test[task.name]
    return results


# ---------------------------------------------------------------------------------- run folders
def read_run_config(run_dir: Path) -> RunConfig:
    """The resolved configuration saved in a run folder."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise CheckpointError(f"{run_dir}: not a polytask run folder (no config.yaml)")
    return load_config(path)


def resume_run(run_dir: Path, *, progress: bool | None = None) -> RunResult:
    """Continue the run in ``run_dir`` from its last checkpoint to its configured epochs."""
    config = read_run_config(run_dir)
    if not (run_dir / "checkpoints" / "last.safetensors").is_file():
        raise CheckpointError(f"{run_dir}: no checkpoints/last.safetensors to resume from")
    return train_from_config(config, run_dir=run_dir, resume=True, progress=progress)


def load_weights(model: MultiTaskModel, path: Path) -> None:
    """Load a checkpoint's model weights into ``model``."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    model.load_state_dict(load_checkpoint(path)["model"])


@dataclass
class TrainedModel:
    """A trained model with everything needed to preprocess inputs and decode outputs."""

    model: MultiTaskModel
    tasks: list[TaskSpec]
    config: RunConfig
    input_shape: Any
    feature_names: list[str] | None
    categorical_names: list[str] | None
    preprocessors: dict[str, Preprocessor]

    def preprocess(self, raw: Any) -> Inputs:
        """Raw inputs (as the dataset gives them) → model inputs, with the run's fitted
        preprocessing."""
        return apply_preprocessors(raw, self.preprocessors)


def load_trained(run_dir: Path, *, checkpoint: str = "best") -> TrainedModel:
    """The model of a run folder, rebuilt from its checkpoint's own metadata."""
    path = run_dir / "checkpoints" / f"{checkpoint}.safetensors"
    if not path.is_file():
        raise CheckpointError(f"{run_dir}: no checkpoints/{checkpoint}.safetensors")
    state = load_checkpoint(path)
    meta = state["metadata"]
    config = parse_config(meta["config"], source=str(path))
    tasks = [TaskSpec.from_dict(t) for t in meta["tasks"]]
    model, _ = build_run_model(config, tasks, meta["input_shape"])
    model.load_state_dict(state["model"])
    model.eval()
    shape = meta["input_shape"]
    return TrainedModel(
        model=model,
        tasks=tasks,
        config=config,
        input_shape=shape if isinstance(shape, dict) else tuple(shape),
        feature_names=meta.get("feature_names"),
        categorical_names=meta.get("categorical_names"),
        preprocessors={k: preprocessor_from_dict(d) for k, d in meta["preprocessors"].items()},
    )


def evaluate_run(run_dir: Path, *, baselines: bool = False) -> RunResult:
    """Re-evaluate a run folder's best model on its test split (and baselines when asked or
    already cached)."""
    trained = load_trained(run_dir)
    config = trained.config
    seed_everything(config.seed, deterministic=config.train.deterministic)
    bundle = build_data(config)
    device = resolve_device(config.train.device)
    trained.model.to(device)
    test = evaluate(
        trained.model,
        eval_batches(bundle, "test", config.data.eval_batch_size),
        trained.tasks,
        device=device,
    )
    add_group_auc(config, trained.model, bundle, trained.tasks, test, device)
    result = RunResult(run_dir=run_dir, tasks=trained.tasks, test=test)
    cached = (run_dir / "baselines").is_dir()
    if baselines or config.evaluate.baselines or cached:
        result.baselines = train_baselines(config, run_dir, trained.tasks)
        result.delta_m = delta_m(test, result.baselines, trained.tasks)
    return result


def predict_file(
    run_dir: Path, input_path: Path, output_path: Path, *, checkpoint: str = "best"
) -> int:
    """Predict every task for each row of ``input_path`` (CSV/Parquet) and write one column per
    task to ``output_path``; returns the number of rows. Inputs are the run's feature columns
    (by name), or, for runs without feature names (images), every column in order."""
    import pandas as pd

    from polytask.data.files import read_features, read_frame, write_frame
    from polytask.serve.predict import predict_arrays

    trained = load_trained(run_dir, checkpoint=checkpoint)
    shape = trained.input_shape
    raw: Any
    if isinstance(shape, dict):  # named blocks: numeric features and categorical columns
        frame = read_frame(input_path)
        raw = {}
        if "numeric" in shape:
            raw["numeric"] = read_features(input_path, trained.feature_names or [])
        if "categorical" in shape:
            names = trained.categorical_names or []
            missing = [c for c in names if c not in frame.columns]
            if missing:
                raise DataError(f"{input_path}: missing categorical column(s) {missing}")
            raw["categorical"] = frame[names].to_numpy(dtype=object)
        for block in sorted(set(shape) - {"numeric", "categorical"}):
            if block.endswith("_present"):
                continue
            if block not in frame.columns:  # e.g. a text block reads the column of its name
                raise DataError(
                    f"{input_path}: the model reads an input block {block!r}; give it as a "
                    f"column named {block!r} (text), columns: {', '.join(map(str, frame.columns))}"
                )
            raw[block] = frame[block].astype(str).tolist()
    elif trained.feature_names is not None:
        raw = read_features(input_path, trained.feature_names)
    else:
        width = int(np.prod(shape))
        frame = read_frame(input_path)
        if frame.shape[1] != width:
            raise DataError(
                f"{input_path}: the model takes {width} input columns "
                f"(shape {list(shape)} flattened), found {frame.shape[1]}"
            )
        features = read_features(input_path, [str(c) for c in frame.columns])
        raw = features.reshape(-1, *shape)
    inputs = trained.preprocess(raw)
    columns = predict_arrays(trained.model, trained.tasks, inputs)
    write_frame(pd.DataFrame(columns), output_path)
    return len(next(iter(columns.values())))
