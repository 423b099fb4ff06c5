"""Random Loss Weighting (Lin, Ye, Zhang & Tsang, TMLR 2022)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, cast

import torch
from torch import Tensor, nn

from polytask.balancing.base import BALANCERS, LossWeighting
from polytask.balancing.weighting._masking import masked_softmax, zero_absent
from polytask.errors import ConfigError
from polytask.tasks import TaskSpec


def _step_seed(seed: int, step: int) -> int:
    """A 63-bit seed mixed from (seed, step) with the SplitMix64 finaliser (deterministic)."""
    mask = (1 << 64) - 1
    x = (seed * 0x9E3779B97F4A7C15 + step + 1) & mask
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
    return (x ^ (x >> 31)) >> 1


def _sync_step_mirror(module: nn.Module, incompatible_keys: Any) -> None:
    """After ``load_state_dict``: refresh RLW's host copy of its step counter."""
    rlw = cast("RandomLossWeighting", module)
    rlw._step = int(rlw.steps)


@BALANCERS.register(
    "rlw", "random loss weighting: softmax of random draws each step (Lin et al., TMLR 2022)"
)
class RandomLossWeighting(LossWeighting):
    """Random Loss Weighting (Lin, Ye, Zhang & Tsang, "Reasonable Effectiveness of Random
    Weighting: A Litmus Test for Multi-Task Learning", TMLR 2022).

    Each call draws ``λ̃ ~ p`` (one value per task) and weights the losses with
    ``λ = softmax(λ̃)`` over the present tasks, so the weights sum to 1 (equal weighting sums
    to the number of tasks: divide a learning rate tuned for it by K to compare).
    ``distribution`` is ``normal`` (``λ̃ ~ N(0, I)``, the paper's default) or ``uniform``
    (``λ̃ ~ U(0, 1)``), both mapped to the simplex by softmax.

    The draws come from a generator on the losses' device re-seeded at every call from
    ``(seed, step)``, where ``step`` is the ``steps`` buffer: the sequence of weights depends only
    on the seed and the number of calls, so it is identical after a ``state_dict`` round trip
    and on every DDP rank. (A host copy of the counter avoids reading the buffer from the device;
    it is refreshed by ``load_state_dict``.) CPU and CUDA generators give different sequences.

    Args:
        tasks: the tasks, in the order of the losses.
        distribution: ``normal`` or ``uniform``.
        seed: the seed of the draws.

    Example:
        >>> rlw = RandomLossWeighting(["a", "b", "c"], seed=1)
        >>> total, w = rlw.combine(torch.ones(3), torch.tensor([True, True, False]))
        >>> round(float(w.sum()), 6), float(w[2])
        (1.0, 0.0)
    """

    distributions: ClassVar[tuple[str, ...]] = ("normal", "uniform")
    steps: Tensor

    def __init__(
        self, tasks: Sequence[TaskSpec | str], *, distribution: str = "normal", seed: int = 0
    ) -> None:
        super().__init__(tasks)
        if distribution not in self.distributions:
            raise ConfigError(
                f"rlw: distribution must be one of {', '.join(self.distributions)}, "
                f"found {distribution!r}"
            )
        if int(seed) != seed:
            raise ConfigError(f"rlw: seed must be an integer, found {seed!r}")
        self.distribution = distribution
        self.seed = int(seed)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self._step = 0
        self._generators: dict[torch.device, torch.Generator] = {}
        self.register_load_state_dict_post_hook(_sync_step_mirror)

    def draws(self, device: torch.device | str = "cpu") -> Tensor:
        """The raw draws ``λ̃`` ``[K]`` (float32) of the current step (does not advance it)."""
        device = torch.device(device)
        generator = self._generators.get(device)
        if generator is None:
            generator = self._generators[device] = torch.Generator(device=device)
        generator.manual_seed(_step_seed(self.seed, self._step))
        sample = torch.randn if self.distribution == "normal" else torch.rand
        return sample(self.num_tasks, generator=generator, device=device)

    def combine(self, losses: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:
        weights = masked_softmax(self.draws(losses.device).to(losses.dtype), present)
        self._step += 1
        self.steps.fill_(self._step)
        return zero_absent(weights * losses, present).sum(), weights
