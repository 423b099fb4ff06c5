"""The privacy budget of a run: Opacus' accountants for the subsampled Gaussian mechanism.

Every private step is one Gaussian mechanism (noise multiplier ``σ``) on a Poisson sample of the
records (rate ``q``), so the ε spent after ``steps`` steps depends only on ``(σ, q, steps, δ)``
and is recomputed from the step counter: nothing to checkpoint, and a resumed run reports the
same ε as an uninterrupted one.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from polytask.errors import ConfigError

__all__ = ["PrivacyBudget", "epsilon_spent"]


@contextmanager
def _quiet() -> Iterator[None]:
    """Without Opacus' advice on the range of RDP orders (a tighter bound than the one
    reported is possible; the reported one holds)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the", category=UserWarning)
        yield


def _opacus_accountants() -> Any:
    """``opacus.accountants``, or a one-line error naming the extra to install."""
    try:
        import opacus.accountants
        import opacus.accountants.utils
    except ImportError as exc:
        raise ConfigError("train.privacy needs Opacus: pip install 'polytask[privacy]'") from exc
    return opacus.accountants


def _accountant(name: str) -> Any:
    accountants = _opacus_accountants()
    PRVAccountant, RDPAccountant = accountants.PRVAccountant, accountants.RDPAccountant

    if name == "rdp":
        return RDPAccountant()
    if name == "prv":
        return PRVAccountant()
    raise ConfigError(f"train.privacy.accountant: must be rdp or prv, found {name!r}")


def epsilon_spent(
    noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str = "rdp"
) -> float:
    """The ε that ``steps`` steps of the subsampled Gaussian mechanism spend at ``delta``, per
    Opacus' ``accountant`` (``rdp`` or ``prv``); 0 before the first step."""
    if steps <= 0:
        return 0.0
    acc = _accountant(accountant)
    acc.history = [(noise_multiplier, sample_rate, steps)]
    with _quiet():
        return float(acc.get_epsilon(delta=delta))


@dataclass(frozen=True)
class PrivacyBudget:
    """The privacy parameters of a run and what it may spend.

    ``noise_multiplier`` is the configured σ, or (``None``) the σ with which ``planned_steps``
    steps spend ``target_epsilon`` (Opacus' ``get_noise_multiplier``).
    """

    target_epsilon: float
    delta: float
    sample_rate: float
    noise_multiplier: float
    accountant: str = "rdp"

    @classmethod
    def plan(
        cls,
        *,
        target_epsilon: float,
        delta: float,
        sample_rate: float,
        planned_steps: int,
        noise_multiplier: float | None = None,
        accountant: str = "rdp",
    ) -> PrivacyBudget:
        """The budget of a run of ``planned_steps`` steps at sampling rate ``sample_rate``."""
        if noise_multiplier is None:
            utils = _opacus_accountants().utils
            with _quiet():
                noise_multiplier = utils.get_noise_multiplier(
                    target_epsilon=target_epsilon,
                    target_delta=delta,
                    sample_rate=sample_rate,
                    steps=planned_steps,
                    accountant=accountant,
                )
        return cls(target_epsilon, delta, sample_rate, float(noise_multiplier), accountant)

    def epsilon(self, steps: int) -> float:
        """The ε spent after ``steps`` steps."""
        return epsilon_spent(
            self.noise_multiplier, self.sample_rate, steps, self.delta, self.accountant
        )

    def affordable_epochs(self, epochs: int, steps_per_epoch: int) -> int:
        """The most whole epochs (at most ``epochs``) whose steps spend no more than
        ``target_epsilon`` (ε grows with the steps: a binary search)."""
        low, high = 0, epochs
        while low < high:
            middle = (low + high + 1) // 2
            if self.epsilon(middle * steps_per_epoch) <= self.target_epsilon:
                low = middle
            else:
                high = middle - 1
        return low

    def to_json(self, steps: int) -> dict[str, Any]:
        """What the run log and ``results.json`` record after ``steps`` steps."""
        spent = self.epsilon(steps)
        return {
            "epsilon": round(spent, 6) if math.isfinite(spent) else spent,
            "target_epsilon": self.target_epsilon,
            "delta": self.delta,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "steps": steps,
            "accountant": self.accountant,
        }
