"""``PrivateTrainer``: the Trainer with DP-SGD steps, a privacy budget and its log.

It changes three things of the Trainer's loop and nothing else: each step's gradient comes
from ``PrivateStep`` (per-record clipping, one Gaussian mechanism, then the balancer); the run
is cut to the epochs whose steps spend at most ``target_epsilon``; and each epoch's record in
``metrics.jsonl`` holds ``privacy`` (the ε spent so far, δ, σ, q, steps, accountant).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from rich.console import Console
from torch import Tensor, nn

from polytask.balancing import Balancer, GradientAggregator
from polytask.config import PrivacyConfig, RunConfig
from polytask.data.batches import Batch
from polytask.data.poisson import PoissonBatches
from polytask.errors import ConfigError
from polytask.models import MultiTaskModel
from polytask.privacy.accountant import PrivacyBudget
from polytask.privacy.mechanism import PrivateStep
from polytask.privacy.methods import private_mode
from polytask.tasks import TaskSpec
from polytask.train.progress import ProgressBar
from polytask.train.trainer import BatchSource, FitResult, Trainer

__all__ = ["PrivateTrainer", "check_model", "check_private_config"]


def check_private_config(config: RunConfig) -> None:
    """A one-line ``ConfigError`` listing the settings that private training cannot honour."""
    train, problems = config.train, []
    if train.accumulate_steps != 1:
        problems.append("train.accumulate_steps must be 1 (a Poisson batch is one step)")
    if train.precision != "fp32":
        problems.append("train.precision must be fp32 (per-record gradients run in fp32)")
    if train.compile:
        problems.append("train.compile must be false (per-record gradients use torch.func)")
    if config.data.datasets is not None:
        problems.append("data.datasets: Poisson sampling needs one dataset (data.dataset)")
    if config.balancing.diagnostics is not None:  # they would log non-private task gradients
        problems.append(
            "balancing.diagnostics must be off (its cosines and norms come from the task "
            "gradients before clipping and noise, which would leak)"
        )
    if problems:
        raise ConfigError("train.privacy: " + "; ".join(problems))


def check_model(model: nn.Module) -> None:
    """A one-line ``ConfigError`` when ``model`` has a layer that mixes the records of a batch
    (BatchNorm), whose per-record gradients do not exist."""
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            raise ConfigError(
                f"train.privacy: {type(module).__name__} at model.{name} mixes the records of a "
                "batch, so its per-record gradients do not exist; use GroupNorm or LayerNorm "
                "(the mlp and tabular encoders: batch_norm: false)"
            )


class PrivateTrainer(Trainer):
    """A ``Trainer`` whose steps are DP-SGD steps (see ``polytask.privacy.mechanism``).

    Args:
        model, balancer, tasks: as for the Trainer; ``method`` is the balancer's registered name
            (a method whose weights would leak is refused with a ``ConfigError``).
        privacy: ``train.privacy``.
        train_batches: Poisson-sampled batches (their rate ``q`` is the accountant's).
        **kwargs: the Trainer's other arguments.
    """

    def __init__(
        self,
        model: MultiTaskModel,
        balancer: Balancer,
        tasks: Sequence[TaskSpec],
        *,
        method: str,
        privacy: PrivacyConfig,
        train_batches: BatchSource,
        **kwargs: Any,
    ) -> None:
        if not isinstance(train_batches, PoissonBatches):
            raise TypeError("PrivateTrainer draws Poisson-sampled batches (PoissonBatches)")
        check_model(model)
        mode = private_mode(method, balancer)
        if isinstance(balancer, GradientAggregator):
            balancer.use_autogram = False  # no layer hooks: the Jacobian comes from torch.func
        super().__init__(model, balancer, tasks, train_batches=train_batches, **kwargs)
        steps_per_epoch = len(train_batches)
        self.budget = PrivacyBudget.plan(
            target_epsilon=privacy.target_epsilon,
            delta=privacy.delta,
            sample_rate=train_batches.sample_rate,
            planned_steps=self.epochs * steps_per_epoch,
            noise_multiplier=privacy.noise_multiplier,
            accountant=privacy.accountant,
        )
        self.planned_epochs = self.epochs
        self.epochs = self.budget.affordable_epochs(self.epochs, steps_per_epoch)
        if self.epochs == 0:
            spent = self.budget.epsilon(steps_per_epoch)
            raise ConfigError(
                f"train.privacy: one epoch ({steps_per_epoch} steps at noise_multiplier "
                f"{self.budget.noise_multiplier:g}) spends ε={spent:.3g} > target_epsilon "
                f"{privacy.target_epsilon:g}; raise noise_multiplier or target_epsilon"
            )
        self.private_step = PrivateStep(
            model,
            balancer,
            self.tasks,
            mode=mode,
            max_grad_norm=privacy.max_grad_norm,
            noise_multiplier=self.budget.noise_multiplier,
            expected_batch_size=train_batches.expected_batch_size,
            runtime=self.runtime,
        )

    def state_dict(self) -> dict[str, Any]:
        """The Trainer's state and the budget: σ is fixed for the whole run."""
        return {**super().state_dict(), "privacy": self.privacy_report()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue with the σ and ``q`` the run started with (a resume that changes
        ``train.epochs`` must not re-plan σ: the accountant assumes one σ for every step)."""
        super().load_state_dict(state)
        saved = state.get("privacy")
        if saved is None:
            return
        if (saved["noise_multiplier"], saved["sample_rate"]) != (
            self.budget.noise_multiplier,
            self.budget.sample_rate,
        ):
            self.budget = replace(
                self.budget,
                noise_multiplier=float(saved["noise_multiplier"]),
                sample_rate=float(saved["sample_rate"]),
            )
            self.private_step.noise_multiplier = self.budget.noise_multiplier
            per_epoch = len(self.train_batches)
            self.epochs = self.budget.affordable_epochs(self.planned_epochs, per_epoch)

    def privacy_report(self) -> dict[str, Any]:
        """The ε spent so far and the mechanism's parameters (``results.json``'s ``privacy``)."""
        return {**self.budget.to_json(self.step), "max_grad_norm": self.private_step.max_grad_norm}

    def train_step(self, batches: Sequence[Batch]) -> tuple[Tensor, Tensor, Tensor]:
        """One DP-SGD step on one Poisson batch; returns (task losses, present, weights)."""
        ((x, y),) = batches
        snapshot = self.guard.snapshot(self.optimizer, (self.model, self.balancer))
        self.optimizer.zero_grad(set_to_none=True)
        logged, present, weights = self.private_step.backward(x, y)
        self.finish_step(snapshot, logged)
        return logged, present, weights

    def _train_epoch(self, bar: ProgressBar) -> dict[str, Any]:
        return {**super()._train_epoch(bar), "privacy": self.privacy_report()}

    def fit(self, *, resume: bool = False) -> FitResult:
        """Train as the Trainer does, within the budget; rank 0 prints the ε spent."""
        result = super().fit(resume=resume)
        if self.runtime.is_main:
            self._say_spent()
        return result

    def _say_spent(self) -> None:
        report = self.privacy_report()
        lines = [
            f"privacy: ε = {report['epsilon']:.4g} spent of target_epsilon "
            f"{report['target_epsilon']:g} (δ = {report['delta']:g}, σ = "
            f"{report['noise_multiplier']:.4g}, q = {report['sample_rate']:.4g}, "
            f"{report['steps']} steps, {report['accountant']} accountant)"
        ]
        if self.epochs < self.planned_epochs:
            after = self.budget.epsilon((self.epochs + 1) * len(self.train_batches))
            lines.append(
                f"privacy: stopped after epoch {self.epochs} of {self.planned_epochs}: one more "
                f"epoch would spend ε = {after:.4g} > target_epsilon {report['target_epsilon']:g}"
            )
        console = Console(stderr=True)
        for line in lines:
            console.print(line, highlight=False, soft_wrap=True)
