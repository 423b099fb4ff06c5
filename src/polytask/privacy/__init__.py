"""Differentially private multi-task training (DP-SGD) for every supported balancing method.

``PrivateTrainer`` runs the Trainer's loop with private steps (``mechanism.PrivateStep``:
per-record clipping, one Gaussian mechanism per step, then the balancer), on Poisson-sampled
batches (``polytask.data.poisson.PoissonBatches``), within a budget that Opacus' accountants
measure (``accountant.PrivacyBudget``). ``methods`` says which balancing methods are private and
why; docs/privacy.md holds the arguments.
"""

from polytask.privacy.accountant import PrivacyBudget, epsilon_spent
from polytask.privacy.mechanism import PrivateStep, clip_factors, noisy_mean
from polytask.privacy.methods import PRIVATE_METHODS, REFUSED_METHODS, private_mode
from polytask.privacy.trainer import PrivateTrainer, check_model, check_private_config

__all__ = [
    "PRIVATE_METHODS",
    "REFUSED_METHODS",
    "PrivacyBudget",
    "PrivateStep",
    "PrivateTrainer",
    "check_model",
    "check_private_config",
    "clip_factors",
    "epsilon_spent",
    "noisy_mean",
    "private_mode",
]
