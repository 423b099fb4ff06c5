"""How often each dataset of a multi-dataset run is drawn: the samplers, by name.

A sampler gives each dataset a probability per epoch (``SAMPLERS``): ``proportional`` (p ∝ n),
``uniform``, ``temperature`` (p ∝ n^(1/T)), ``round_robin`` (deterministic cycling),
``annealed`` (Stickland & Murray, ICML 2019) and ``fixed`` (a user-given mix). The
``MultiTaskMixer`` (``polytask.data.mixing``) draws batches with them.

Example:
    >>> build_sampler("temperature", {"temperature": 2.0}).probabilities([100, 1], 1, 1).round(3)
    array([0.909, 0.091])
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from polytask.errors import ConfigError, unknown_name
from polytask.registry import Registry

__all__ = [
    "SAMPLERS",
    "AnnealedSampler",
    "FixedSampler",
    "ProportionalSampler",
    "RoundRobinSampler",
    "Sampler",
    "TemperatureSampler",
    "UniformSampler",
    "build_sampler",
]


class Sampler:
    """How often each dataset is drawn: ``probabilities(sizes, epoch, total_epochs)``.

    ``sizes`` are the training sizes of the datasets, ``epoch`` counts from 1 and
    ``total_epochs`` is the run's number of epochs. ``assign`` turns the probabilities into the
    dataset of each of ``count`` consecutive draws (``start`` is the index of the first draw in
    the whole run): i.i.d. draws by default, a fixed cycle for ``round_robin``.
    """

    name: ClassVar[str] = "sampler"

    def probabilities(self, sizes: Sequence[int], epoch: int, total_epochs: int) -> np.ndarray:
        """One probability per dataset (non-negative, summing to 1)."""
        raise NotImplementedError

    def assign(
        self, rng: np.random.Generator, probabilities: np.ndarray, count: int, start: int
    ) -> np.ndarray:
        """The dataset index (``int64``) of each of ``count`` draws."""
        return rng.choice(len(probabilities), size=count, p=probabilities).astype(np.int64)

    def bind(self, names: Sequence[str]) -> None:
        """Called by the mixer with its datasets' names; raise ``ConfigError`` when this sampler
        cannot serve them."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _power_probabilities(sizes: Sequence[int], alpha: float) -> np.ndarray:
    """``p_i ∝ n_i^alpha``, computed in log space (no overflow for large ``n``)."""
    logs = alpha * np.log(np.asarray(sizes, dtype=np.float64))
    weights = np.exp(logs - logs.max())
    return weights / weights.sum()


SAMPLERS: Registry[Callable[..., Sampler]] = Registry("sampler", provided=("weights",))


@SAMPLERS.register("proportional", "p ∝ dataset size: every training sample equally often")
class ProportionalSampler(Sampler):
    """p_i ∝ n_i: each sample of every dataset is drawn equally often (small tasks are seen
    rarely)."""

    name = "proportional"

    def probabilities(self, sizes: Sequence[int], epoch: int, total_epochs: int) -> np.ndarray:
        return _power_probabilities(sizes, 1.0)


@SAMPLERS.register("uniform", "every dataset equally often, whatever its size")
class UniformSampler(Sampler):
    """p_i = 1/D: every dataset is drawn equally often (small datasets are oversampled)."""

    name = "uniform"

    def probabilities(self, sizes: Sequence[int], epoch: int, total_epochs: int) -> np.ndarray:
        return np.full(len(sizes), 1.0 / len(sizes))


@SAMPLERS.register("temperature", "p ∝ n^(1/T): T=1 proportional, T→∞ uniform")
class TemperatureSampler(Sampler):
    """Temperature-scaled sampling, p_i ∝ n_i^(1/T), as in multilingual translation
    (Arivazhagan et al., 2019) and multi-task NLP: ``temperature=1`` is proportional, larger
    temperatures move toward uniform.

    Args:
        temperature: T > 0.
    """

    name = "temperature"

    def __init__(self, temperature: float = 2.0) -> None:
        if not temperature > 0 or not math.isfinite(temperature):
            raise ConfigError(
                f"sampler 'temperature': temperature must be > 0, found {temperature}"
            )
        self.temperature = float(temperature)

    def probabilities(self, sizes: Sequence[int], epoch: int, total_epochs: int) -> np.ndarray:
        return _power_probabilities(sizes, 1.0 / self.temperature)

    def __repr__(self) -> str:
        return f"TemperatureSampler(temperature={self.temperature})"


@SAMPLERS.register("round_robin", "datasets in turn, one draw each (deterministic cycle)")
class RoundRobinSampler(Sampler):
    """Datasets in a fixed cycle 0, 1, ..., D-1, 0, ... continued across epochs (a batch each in
    ``single`` mode, a sample each in ``mixed`` mode): uniform frequencies without sampling
    noise."""

    name = "round_robin"

    def probabilities(self, sizes: Sequence[int], epoch: int, total_epochs: int) -> np.ndarray:
        return np.full(len(sizes), 1.0 / len(sizes))

    def assign(
        self, rng: np.random.Generator, probabilities: np.ndarray, count: int, start: int
    ) -> np.ndarray:
        return (start + np.arange(count, dtype=np.int64)) % len(probabilities)


@SAMPLERS.register("annealed", "p ∝ n^α, α from 1 to 0.2 over training (Stickland & Murray)")
class AnnealedSampler(Sampler):
    """Annealed sampling: p_i ∝ n_i^α with α = 1 − 0.8·(e − 1)/(E − 1) at epoch e of E, so
    sampling starts proportional to size and ends close to uniform (α = 0.2). With a single
    epoch, α = 1.

    References:
        Stickland, A. C. and Murray, I., 2019. BERT and PALs: Projected Attention Layers for
        Efficient Adaptation in Multi-Task Learning. ICML 2019, section 4 ("annealed sampling").
    """

    name = "annealed"

    @staticmethod
    def alpha(epoch: int, total_epochs: int) -> float:
        """α at ``epoch`` (1-based, clamped to 1..total_epochs)."""
        if total_epochs <= 1:
            return 1.0
        e = min(max(epoch, 1), total_epochs)
        return 1.0 - 0.8 * (e - 1) / (total_epochs - 1)

    def probabilities(self, sizes: Sequence[int], epoch: int, total_epochs: int) -> np.ndarray:
        return _power_probabilities(sizes, self.alpha(epoch, total_epochs))


@SAMPLERS.register("fixed", "a user-given mix: each dataset's `weight`, normalised")
class FixedSampler(Sampler):
    """A fixed mix: p_i = w_i / Σ w. In a configuration each entry of ``data.datasets`` gives
    its ``weight``.

    Args:
        weights: one non-negative weight per dataset, in order, or by dataset name.
    """

    name = "fixed"

    def __init__(self, weights: Sequence[float] | Mapping[str, float]) -> None:
        if weights is None:
            raise ConfigError("sampler 'fixed' needs weights: give each dataset a `weight`")
        self.weights = weights
        self._bound: np.ndarray | None = None

    def bind(self, names: Sequence[str]) -> None:
        self._bound = self._resolve(names)

    def _resolve(self, names: Sequence[str]) -> np.ndarray:
        if isinstance(self.weights, Mapping):
            missing = [n for n in names if n not in self.weights]
            if missing:
                raise ConfigError(
                    f"sampler 'fixed': no weight for dataset {missing[0]!r} "
                    f"(weights given for {', '.join(map(repr, self.weights)) or 'none'})"
                )
            extra = [n for n in self.weights if n not in names]
            if extra:
                raise ConfigError(f"sampler 'fixed': weight for unknown dataset {extra[0]!r}")
            values = [self.weights[n] for n in names]
        else:
            values = list(self.weights)
            if len(values) != len(names):
                raise ConfigError(
                    f"sampler 'fixed': {len(values)} weight(s) for {len(names)} datasets "
                    f"({', '.join(map(repr, names))})"
                )
        for name, value in zip(names, values, strict=True):
            if value is None or not math.isfinite(float(value)) or float(value) < 0:
                raise ConfigError(
                    f"sampler 'fixed': dataset {name!r} needs a weight >= 0, found {value}"
                )
        w = np.asarray(values, dtype=np.float64)
        if w.sum() <= 0:
            raise ConfigError("sampler 'fixed': the weights sum to 0; give some dataset weight > 0")
        return w / w.sum()

    def probabilities(self, sizes: Sequence[int], epoch: int, total_epochs: int) -> np.ndarray:
        if self._bound is not None and len(self._bound) == len(sizes):
            return self._bound
        if isinstance(self.weights, Mapping):
            raise ConfigError("sampler 'fixed': weights by name need the mixer's dataset names")
        return self._resolve([f"#{i}" for i in range(len(sizes))])

    def __repr__(self) -> str:
        return f"FixedSampler(weights={self.weights!r})"


def build_sampler(
    name: str,
    params: Mapping[str, Any] | None = None,
    *,
    weights: Sequence[float | None] | Mapping[str, float | None] | None = None,
) -> Sampler:
    """The sampler registered as ``name`` with ``params`` (and the datasets' ``weights`` when
    it takes them: ``fixed``); unknown names and parameters fail with a ``ConfigError`` listing
    the valid ones."""
    if name not in SAMPLERS:
        raise ConfigError(unknown_name("sampler", name, SAMPLERS.names()))
    problems = SAMPLERS.check_params(name, params or {})
    if problems:
        raise ConfigError("; ".join(problems))
    builder = SAMPLERS.get(name)
    takes_weights = "weights" in inspect.signature(builder).parameters
    provided = {"weights": weights} if takes_weights else {}
    return builder(**(params or {}), **provided)
