"""From a validated ``RunConfig`` to the objects of a run: model, balancer, optimizer, schedule.

Only this module reads the model, balancing, optimizer and schedule sections of a configuration;
the data sections are read by ``polytask.run.data``.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from polytask.balancing import Balancer, build_balancer
from polytask.config import RunConfig, TransferConfig
from polytask.errors import ConfigError, PolytaskError
from polytask.models import ARCHITECTURES, ENCODERS, HEADS, MultiTaskModel, build_model
from polytask.models.transfer import apply_freeze, parameter_groups
from polytask.tasks import TaskSpec
from polytask.train.optim import build_optimizer, build_scheduler


def seed_everything(seed: int, *, deterministic: bool = True) -> None:
    """Seed Python, NumPy and torch; make CPU kernels deterministic."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(deterministic, warn_only=True)


#: What a builder raises for a value of the right type that it cannot use (a negative width, a
#: kernel larger than its input...). Anything else is a bug and keeps its traceback.
_BUILD_ERRORS = (
    PolytaskError,
    ArithmeticError,
    AssertionError,
    LookupError,
    RuntimeError,
    TypeError,
    ValueError,
)


def build_model_for(
    config: RunConfig, tasks: Sequence[TaskSpec], input_shape: Any
) -> MultiTaskModel:
    """The (untrained) model ``config.model`` describes for ``tasks`` and ``input_shape``.

    A builder that fails on its parameters' values (``hidden: [-5]``) is a ``ConfigError``
    naming the section: ``model.encoder_params``, ``model.head_params`` or
    ``model.architecture_params``."""
    m = config.model
    try:
        model = build_model(
            tasks,
            input_shape,
            encoder=m.encoder,
            encoder_params=m.encoder_params,
            head=m.head,
            head_params=m.head_params,
            architecture=m.architecture,
            architecture_params=m.architecture_params,
        )
    except _BUILD_ERRORS as exc:
        field, kind, name, params = _failing_part(config, tasks, input_shape)
        raise ConfigError(_cannot_build(field, kind, name, params, exc)) from exc
    if m.transfer.freeze != "none":  # a pretrained backbone starts frozen (model.transfer)
        try:
            apply_freeze(model, m.transfer.freeze, encoder=m.encoder)
        except ConfigError as exc:
            raise ConfigError(f"model.transfer.freeze: {exc}") from None
    return model


def _failing_part(
    config: RunConfig, tasks: Sequence[TaskSpec], input_shape: Any
) -> tuple[str, str, str, Mapping[str, Any]]:
    """Which part of ``config.model`` fails to build: the encoder alone, then each task's head
    on its width, else the architecture (tried on a side copy of the random state)."""
    m = config.model
    shape = input_shape if isinstance(input_shape, Mapping) else tuple(input_shape)
    parts: list[tuple[str, str, str, Mapping[str, Any]]] = [
        ("model.encoder_params", ENCODERS.kind, m.encoder, m.encoder_params),
        ("model.head_params", HEADS.kind, m.head, m.head_params),
    ]
    with torch.random.fork_rng(devices=[]):
        steps: list[Callable[[Any], Any]] = [
            lambda _: ENCODERS.get(m.encoder)(shape, **m.encoder_params),
            lambda encoder: [
                HEADS.get(m.head)(encoder.out_features, task, **m.head_params) for task in tasks
            ],
        ]
        built: Any = None
        for part, step in zip(parts, steps, strict=True):
            try:
                built = step(built)
            except _BUILD_ERRORS:
                return part
    return ("model.architecture_params", ARCHITECTURES.kind, m.architecture, m.architecture_params)


def _cannot_build(
    field: str, kind: str, name: str, params: Mapping[str, Any], exc: BaseException
) -> str:
    reason = " ".join(str(exc).split()) or type(exc).__name__
    given = f" with {dict(params)}" if params else ""
    return f"{field}: cannot build {kind} {name!r}{given}: {reason}"


def build_balancer_for(config: RunConfig, tasks: Sequence[TaskSpec]) -> Balancer:
    """The balancing method ``config.balancing`` describes; a builder that fails on its
    parameters' values is a ``ConfigError`` naming ``balancing.params``."""
    b = config.balancing
    try:
        return build_balancer(b.method, tasks, params=b.params, log_losses=b.log_losses)
    except _BUILD_ERRORS as exc:
        raise ConfigError(
            _cannot_build("balancing.params", "balancing method", b.method, b.params, exc)
        ) from exc


def build_optimization(
    config: RunConfig,
    model: MultiTaskModel,
    balancer: Balancer,
    *,
    steps_per_epoch: int,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """The optimizer over the model's and the balancer's parameters, and its per-step
    schedule over ``config.train.epochs`` epochs of ``steps_per_epoch`` optimizer steps."""
    transfer = config.model.transfer
    frozen = transfer.freeze != "none" and not model.shared_parameters()
    if frozen and balancer.needs_shared_params:
        raise ConfigError(
            f"model.transfer.freeze: {transfer.freeze} leaves no shared parameter for the "
            f"gradient method {config.balancing.method!r} to balance; freeze until:<module> "
            "instead, or use a loss weighting (e.g. equal, uncertainty)"
        )
    params: Any = [*model.parameters(), *balancer.parameters()]
    if transfer != TransferConfig():  # the backbone in its own group, at its own lr
        params = parameter_groups(
            model,
            balancer.parameters(),
            lr=config.optimizer.lr,
            backbone_lr_ratio=transfer.backbone_lr_ratio,
            keep_frozen=transfer.unfreeze_at_epoch is not None,
        )
    optimizer = build_optimizer(
        params,
        name=config.optimizer.name,
        lr=config.optimizer.lr,
        weight_decay=config.optimizer.weight_decay,
        momentum=config.optimizer.momentum,
        betas=config.optimizer.betas,
    )
    scheduler = build_scheduler(
        optimizer,
        name=config.schedule.name,
        warmup_steps=round(config.schedule.warmup_epochs * steps_per_epoch),
        total_steps=config.train.epochs * steps_per_epoch,
        min_lr_ratio=config.schedule.min_lr_ratio,
    )
    return optimizer, scheduler
