"""From a validated ``RunConfig`` to the objects of a run: model, balancer, optimizer, schedule.

Only this module reads the model, balancing, optimizer and schedule sections of a configuration;
the data sections are read by ``polytask.run.data``.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from polytask.balancing import Balancer, build_balancer
from polytask.config import RunConfig
from polytask.models import MultiTaskModel, build_model
from polytask.tasks import TaskSpec
from polytask.train.optim import build_optimizer, build_scheduler


def seed_everything(seed: int, *, deterministic: bool = True) -> None:
    """Seed Python, NumPy and torch; make CPU kernels deterministic."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(deterministic, warn_only=True)


def build_model_for(
    config: RunConfig, tasks: Sequence[TaskSpec], input_shape: Any
) -> MultiTaskModel:
    """The (untrained) model ``config.model`` describes for ``tasks`` and ``input_shape``."""
    return build_model(
        tasks,
        input_shape,
        encoder=config.model.encoder,
        encoder_params=config.model.encoder_params,
        head=config.model.head,
        head_params=config.model.head_params,
        architecture=config.model.architecture,
        architecture_params=config.model.architecture_params,
    )


def build_balancer_for(config: RunConfig, tasks: Sequence[TaskSpec]) -> Balancer:
    """The balancing method ``config.balancing`` describes."""
    return build_balancer(
        config.balancing.method,
        tasks,
        params=config.balancing.params,
        log_losses=config.balancing.log_losses,
    )


def build_optimization(
    config: RunConfig,
    model: MultiTaskModel,
    balancer: Balancer,
    *,
    steps_per_epoch: int,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """The optimizer over the model's and the balancer's parameters, and its per-step
    schedule over ``config.train.epochs`` epochs of ``steps_per_epoch`` optimizer steps."""
    optimizer = build_optimizer(
        [*model.parameters(), *balancer.parameters()],
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
