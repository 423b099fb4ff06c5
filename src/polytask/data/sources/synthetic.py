"""``mmoe-synthetic``: the controllable-relatedness regression tasks of the MMoE paper."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from polytask.data.sources.common import hide_labels, rng_for
from polytask.data.sources.registry import DATASETS
from polytask.data.table import MultiLabelTable
from polytask.errors import ConfigError
from polytask.tasks import TaskSpec


@dataclass(frozen=True)
class MMoEParameters:
    """The fixed parameters of the generator: task weight vectors and sine shapes."""

    weights: np.ndarray  # float64 [K, d]: w_k, with cos(w_k, w_l) = correlation for k != l
    alpha: np.ndarray  # float64 [m]
    beta: np.ndarray  # float64 [m]


def gram_factor(gram: np.ndarray) -> np.ndarray:
    """Lower-triangular ``L`` with ``L @ L.T == gram`` for a positive semi-definite ``gram``
    (Cholesky that tolerates zero pivots, e.g. for correlation 1 or -1)."""
    k = len(gram)
    factor = np.zeros_like(gram, dtype=np.float64)
    for i in range(k):
        for j in range(i + 1):
            rest = gram[i, j] - factor[i, :j] @ factor[j, :j]
            if i == j:
                factor[i, i] = math.sqrt(max(rest, 0.0))
            elif factor[j, j] > 1e-12:
                factor[i, j] = rest / factor[j, j]
    return factor


def mmoe_parameters(
    *,
    num_tasks: int,
    input_dim: int,
    correlation: float,
    scale: float,
    num_sin: int,
    seed: int,
    blocks: int = 1,
) -> MMoEParameters:
    """Weights ``w_k = scale * U @ L[k]``: ``U`` has ``num_tasks`` random orthonormal columns
    ``u_1..u_K`` in R^d and ``L`` is the Cholesky factor of the K x K Gram matrix with 1 on the
    diagonal and ``correlation`` elsewhere, so every pair of task weight vectors has cosine
    ``correlation``. For two tasks this is exactly the paper's ``w1 = c u1``,
    ``w2 = c (p u1 + sqrt(1 - p^2) u2)``. With ``blocks`` > 1 the tasks are cut into that many
    consecutive blocks of (nearly) equal size: pairs within a block have cosine ``correlation``,
    pairs across blocks are orthogonal (a block-diagonal Gram matrix)."""
    if not 1 <= blocks <= max(num_tasks, 1):
        raise ConfigError(
            f"mmoe-synthetic: blocks must be in 1..num_tasks ({num_tasks}), found {blocks}"
        )
    parts = np.array_split(np.arange(num_tasks), blocks)
    block_of = np.concatenate([np.full(len(part), b) for b, part in enumerate(parts)])
    largest = int(np.bincount(block_of).max()) if num_tasks else 1
    if num_tasks < 1 or num_tasks > input_dim:
        raise ConfigError(
            f"mmoe-synthetic: num_tasks must be in 1..input_dim ({input_dim}), found {num_tasks}"
        )
    low = -1.0 / (largest - 1) if largest > 1 else -1.0
    if not low <= correlation <= 1.0:
        raise ConfigError(
            f"mmoe-synthetic: with {largest} tasks{' in a block' if blocks > 1 else ''} the "
            f"correlation must be in [{low:.4g}, 1] (all pairs equally correlated), "
            f"found {correlation}"
        )
    if num_sin < 0:
        raise ConfigError(f"mmoe-synthetic: num_sin must be >= 0, found {num_sin}")
    rng = rng_for(seed, 0)
    basis, _ = np.linalg.qr(rng.standard_normal((input_dim, num_tasks)))
    gram = np.full((num_tasks, num_tasks), correlation) + (1.0 - correlation) * np.eye(num_tasks)
    gram = np.where(block_of[:, None] == block_of[None, :], gram, 0.0)
    weights = scale * gram_factor(gram) @ basis.T
    return MMoEParameters(weights, rng.standard_normal(num_sin), rng.standard_normal(num_sin))


@DATASETS.register("mmoe-synthetic", "synthetic regression tasks of tunable correlation (MMoE)")
def mmoe_synthetic(
    *,
    seed: int,
    num_samples: int = 10_000,
    num_tasks: int = 2,
    input_dim: int = 100,
    correlation: float = 0.5,
    scale: float = 1.0,
    num_sin: int = 10,
    noise_std: float = 0.1,
    missing_fraction: float = 0.0,
    blocks: int = 1,
) -> MultiLabelTable:
    """Regression tasks whose relatedness is set by ``correlation`` (Ma et al., section 3.2).

    ``x ~ N(0, I_d)`` and ``y_k = w_k.x + sum_j sin(alpha_j w_k.x + beta_j) + eps_k`` with
    ``alpha_j, beta_j ~ N(0, 1)`` shared by all tasks and ``eps_k ~ N(0, noise_std^2)`` (the
    paper's N(0, 0.01) is a variance: std 0.1). The weights ``w_k`` have norm ``scale`` and
    pairwise cosine ``correlation`` (see ``mmoe_parameters``; with more than two tasks this is
    built from a Gram matrix, so correlation must be >= -1/(K-1)). With ``blocks`` > 1 only
    tasks of one block (consecutive tasks, blocks of nearly equal size) are correlated; tasks of
    different blocks are independent (orthogonal weights): a case with a known task grouping.
    Tasks ``t1..tK``.

    References:
        Ma, J., Zhao, Z., Yi, X., Chen, J., Hong, L. and Chi, E. H., 2018. Modeling Task
        Relationships in Multi-task Learning with Multi-gate Mixture-of-Experts. KDD 2018.
    """
    if num_samples < 1:
        raise ConfigError(f"mmoe-synthetic: num_samples must be >= 1, found {num_samples}")
    params = mmoe_parameters(
        num_tasks=num_tasks,
        input_dim=input_dim,
        correlation=correlation,
        scale=scale,
        num_sin=num_sin,
        seed=seed,
        blocks=blocks,
    )
    rng = rng_for(seed, 1)
    x = rng.standard_normal((num_samples, input_dim))
    linear = x @ params.weights.T  # [N, K]
    waves = np.sin(linear[:, :, None] * params.alpha + params.beta).sum(axis=-1)
    y = linear + waves + noise_std * rng.standard_normal(linear.shape)
    tasks = [TaskSpec(f"t{k + 1}", "regression") for k in range(num_tasks)]
    targets = {task.name: y[:, k].astype(np.float32) for k, task in enumerate(tasks)}
    return MultiLabelTable(
        inputs=x.astype(np.float32),
        targets=hide_labels(targets, tasks, fraction=missing_fraction, seed=seed),
        tasks=tasks,
        feature_names=[f"x{i}" for i in range(input_dim)],
        source="mmoe-synthetic",
    )
