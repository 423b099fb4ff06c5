"""Loss weighting methods: the update is the gradient of a weighted sum of the task losses.

Every method here works on the K task losses alone (GradNorm also looks at the gradient norms of
the last shared layer), keeps its state in buffers or parameters (so ``state_dict()`` checkpoints
it) and runs as tensor operations on the losses' device, without host synchronisation. Tasks
absent from a batch (``present[k]`` false) contribute exactly 0 and get weight 0.

Methods that take ratios or logarithms of the losses declare ``requires_positive_losses = True``:
they cannot run on log-losses (``transforms.LogLosses``), which are negative below 1.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, cast

import torch
from torch import Tensor, nn

from polytask.balancing.base import BALANCERS, Balancer, BalanceResult, LossWeighting, stack_losses
from polytask.balancing.jacobian import task_jacobian
from polytask.errors import ConfigError
from polytask.tasks import TaskSpec


@BALANCERS.register("equal", "sum of the task losses, every task weighted 1")
class EqualWeighting(LossWeighting):
    """Equal weighting: the update is the gradient of ``sum_k L_k``.

    Example:
        >>> w = EqualWeighting(["a", "b"])
        >>> total, weights = w.combine(torch.tensor([1.0, 3.0]), torch.tensor([True, True]))
        >>> float(total), weights.tolist()
        (4.0, [1.0, 1.0])
    """

    def combine(self, losses: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:
        weights = present.to(losses.dtype)
        return (weights * losses).sum(), weights


@BALANCERS.register(
    "uncertainty", "learned homoscedastic-uncertainty weights (Kendall, Gal & Cipolla, CVPR 2018)"
)
class UncertaintyWeighting(LossWeighting):
    """Homoscedastic uncertainty weighting (Kendall, Gal & Cipolla, "Multi-Task Learning Using
    Uncertainty to Weigh Losses for Scene Geometry and Semantics", CVPR 2018).

    Each task has a learnable ``s_k = log σ_k²`` (initial value ``init_log_var``). The combined
    loss is, following eq. (7)-(10) of the paper,

        ``sum_k c_k · exp(-s_k) · L_k + s_k / 2``

    with ``c_k = 1/2`` for regression (Gaussian likelihood) and ``c_k = 1`` for classification
    (scaled softmax likelihood). Tasks given as plain names use ``c_k = 1/2``. Tasks absent from
    a batch contribute nothing (neither loss nor regulariser). The reported weights are
    ``c_k · exp(-s_k)``. The log-variances are parameters: give ``balancer.parameters()`` to the
    optimizer; they are saved in the balancer's ``state_dict``.

    Example:
        >>> u = UncertaintyWeighting([TaskSpec("r", "regression"), TaskSpec("c", "binary")])
        >>> total, w = u.combine(torch.tensor([2.0, 1.0]), torch.tensor([True, True]))
        >>> float(total.detach()), w.tolist()   # 0.5*1*2 + 0 + 1*1*1 + 0 at s = 0
        (2.0, [0.5, 1.0])
    """

    requires_positive_losses: ClassVar[bool] = True
    factors: Tensor

    def __init__(self, tasks: Sequence[TaskSpec | str], *, init_log_var: float = 0.0) -> None:
        super().__init__(tasks)
        self.log_vars = nn.Parameter(torch.full((self.num_tasks,), float(init_log_var)))
        factors = [
            1.0 if isinstance(t, TaskSpec) and t.kind != "regression" else 0.5 for t in self.tasks
        ]
        self.register_buffer("factors", torch.tensor(factors))

    def combine(self, losses: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:
        log_vars = self.log_vars.to(losses.dtype)
        weights = self.factors.to(losses.dtype) * torch.exp(-log_vars)
        terms = weights * losses + 0.5 * log_vars
        total = torch.where(present, terms, torch.zeros_like(terms)).sum()
        return total, torch.where(present, weights, torch.zeros_like(weights))


# --------------------------------------------------------------------------- helpers
#: added where the papers divide by or take the log of a loss (as LibMTL and the FAMO code do)
_EPS = 1e-8


def _tiny(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).tiny)


def _zero_absent(values: Tensor, present: Tensor) -> Tensor:
    """``values`` on the present tasks, exactly 0 on the absent ones."""
    return torch.where(present, values, torch.zeros_like(values))


def masked_softmax(logits: Tensor, present: Tensor) -> Tensor:
    """Softmax over the present entries of ``logits``; 0 on the absent ones (all 0 when none is
    present). Infinite logits are clamped to the dtype's range, so the result is always finite.

    Example:
        >>> masked_softmax(torch.zeros(3), torch.tensor([True, False, True])).tolist()
        [0.5, 0.0, 0.5]
    """
    info = torch.finfo(logits.dtype)
    logits = torch.nan_to_num(logits, nan=0.0, posinf=info.max, neginf=info.min)
    masked = torch.where(present, logits, torch.full_like(logits, info.min))
    exps = _zero_absent(torch.exp(masked - masked.max()), present)
    return exps / exps.sum().clamp_min(info.tiny)


# --------------------------------------------------------------------------- DWA
@BALANCERS.register(
    "dwa",
    "dynamic weight average from the tasks' loss descent rates (Liu, Johns & Davison, CVPR 2019)",
)
class DynamicWeightAverage(LossWeighting):
    """Dynamic Weight Average (Liu, Johns & Davison, "End-to-End Multi-Task Learning with
    Attention", CVPR 2019, eq. 7).

    The paper weights epoch ``t`` with the ratio of the last two epoch-average losses:

        ``w_k(t) = K · exp(r_k(t-1) / T) / Σ_i exp(r_i(t-1) / T)``,
        ``r_k(t-1) = L_k(t-1) / L_k(t-2)``,

    and ``w_k = 1`` for the first two epochs. The balancer does not read the trainer's epoch: it
    averages the losses it receives over consecutive windows of ``window`` calls (a task's
    average is over the calls where it was present), so setting ``window`` to the number of
    steps per epoch reproduces the paper; a shorter window adapts faster. Weights are 1 during
    the first two windows. With absent tasks, the softmax runs over the present tasks and ``K``
    is the number of present tasks (every weight is 1 when the ratios agree, as in equal
    weighting). A task absent for a whole window keeps its previous average; a ratio whose
    denominator is not positive (the task was never seen) counts as 1. Losses should be
    positive.

    State (buffers, checkpointed): ``steps``, ``windows`` (completed windows), ``window_sum``
    and ``window_count`` (the current window) and ``averages`` (rows: window ``t-2``, ``t-1``).

    Args:
        tasks: the tasks, in the order of the losses.
        window: calls per averaging window (the paper's epoch).
        temperature: the softmax temperature ``T`` (larger: weights closer to 1).

    Example:
        >>> dwa = DynamicWeightAverage(["a", "b"], window=1)
        >>> present = torch.tensor([True, True])
        >>> for losses in ([1.0, 1.0], [1.0, 0.5]):  # two windows: weights stay 1
        ...     _ = dwa.combine(torch.tensor(losses), present)
        >>> total, w = dwa.combine(torch.tensor([1.0, 0.5]), present)
        >>> [round(v, 4) for v in w.tolist()]  # r = (1, 0.5): 2 * softmax(r / 2)
        [1.1244, 0.8756]
    """

    requires_positive_losses: ClassVar[bool] = True
    steps: Tensor
    windows: Tensor
    window_sum: Tensor
    window_count: Tensor
    averages: Tensor

    def __init__(
        self, tasks: Sequence[TaskSpec | str], *, window: int = 100, temperature: float = 2.0
    ) -> None:
        super().__init__(tasks)
        if int(window) != window or window < 1:
            raise ConfigError(f"dwa: window must be an integer >= 1, found {window!r}")
        if not temperature > 0:
            raise ConfigError(f"dwa: temperature must be > 0, found {temperature!r}")
        self.window = int(window)
        self.temperature = float(temperature)
        k = self.num_tasks
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("windows", torch.zeros((), dtype=torch.long))
        self.register_buffer("window_sum", torch.zeros(k))
        self.register_buffer("window_count", torch.zeros(k))
        self.register_buffer("averages", torch.zeros(2, k))

    def ratios(self) -> Tensor:
        """``r_k = L_k(t-1) / L_k(t-2)`` from the last two window averages (1 where undefined)."""
        before, last = self.averages[0], self.averages[1]
        safe = before.clamp_min(_tiny(before.dtype))
        return torch.where(before > 0, last / safe, torch.ones_like(last))

    def combine(self, losses: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:
        count = present.sum().to(losses.dtype)
        logits = self.ratios().to(losses.dtype) / self.temperature
        adaptive = count * masked_softmax(logits, present)
        ready = torch.ge(self.windows, 2)
        weights = torch.where(ready, adaptive, present.to(losses.dtype))
        self._accumulate(losses.detach(), present)
        return _zero_absent(weights * losses, present).sum(), weights

    @torch.no_grad()
    def _accumulate(self, losses: Tensor, present: Tensor) -> None:
        self.window_sum += _zero_absent(losses, present).to(self.window_sum.dtype)
        self.window_count += present.to(self.window_count.dtype)
        self.steps += 1
        closing = torch.eq(self.steps % self.window, 0)
        mean = torch.where(
            self.window_count > 0,
            self.window_sum / self.window_count.clamp_min(1),
            self.averages[1],
        )
        shifted = torch.stack([self.averages[1], mean])
        self.averages.copy_(torch.where(closing, shifted, self.averages))
        self.window_sum.masked_fill_(closing, 0.0)
        self.window_count.masked_fill_(closing, 0.0)
        self.windows += closing.long()


# --------------------------------------------------------------------------- RLW
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
        return _zero_absent(weights * losses, present).sum(), weights


# --------------------------------------------------------------------------- GLS
@BALANCERS.register(
    "gls", "geometric mean of the task losses (Chennupati et al., MultiNet++, CVPRW 2019)"
)
class GeometricLossStrategy(LossWeighting):
    """Geometric Loss Strategy (Chennupati, Sistu, Yogamani & Rawashdeh, "MultiNet++:
    Multi-Stream Feature Aggregation and Geometric Loss Strategy for Multi-Task Learning",
    CVPR Workshops 2019).

    The combined loss is the geometric mean of the present tasks' losses,

        ``L = (Π_k L_k)^(1/n) = exp(mean_k log L_k)``   (``n`` = number of present tasks),

    computed in log space; absent tasks are left out of the product. Its gradient is
    ``Σ_k w_k ∇L_k`` with the reported effective weights ``w_k = ∂L/∂L_k = L / (n · L_k)``: every
    task gets the same relative step ``w_k L_k = L / n``, whatever the scale of its loss. Losses
    below ``1e-8`` are clamped there (such a task gets weight 0): losses should be non-negative.

    Example:
        >>> gls = GeometricLossStrategy(["a", "b"])
        >>> total, w = gls.combine(torch.tensor([1.0, 4.0]), torch.tensor([True, True]))
        >>> float(total), w.tolist()   # sqrt(1 * 4) = 2; 2 / (2 * 1), 2 / (2 * 4)
        (2.0, [1.0, 0.25])
    """

    requires_positive_losses: ClassVar[bool] = True

    def combine(self, losses: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:
        count = present.sum()
        clamped = losses.clamp_min(_EPS)
        safe = torch.where(present, clamped, torch.ones_like(losses))
        mean_log = torch.log(safe).sum() / count.clamp_min(1).to(losses.dtype)
        total = torch.where(count > 0, torch.exp(mean_log), torch.zeros_like(mean_log))
        weights = total.detach() / (count.to(losses.dtype).clamp_min(1) * safe.detach())
        weights = _zero_absent(weights, present & (losses >= _EPS))
        return total, weights


# --------------------------------------------------------------------------- GradNorm
@BALANCERS.register(
    "gradnorm",
    "learned weights equalising gradient norms and training rates (Chen et al., ICML 2018)",
)
class GradNorm(Balancer):
    """GradNorm (Chen, Badrinarayanan, Lee & Rabinovich, "GradNorm: Gradient Normalization for
    Adaptive Loss Balancing in Deep Multitask Networks", ICML 2018).

    Learnable weights ``w_k`` (a parameter, initially 1). At each call, with ``W`` the last shared
    layer, ``G_k = ||∇_W w_k L_k|| = w_k ||∇_W L_k||``, the inverse training rates
    ``r_k = (L_k / L_k(0)) / mean_i (L_i / L_i(0))`` and the target
    ``G_k* = mean_i(G_i) · r_k^α`` (held constant), the GradNorm loss is
    ``Σ_k |G_k - G_k*|``. The model's gradients are those of ``Σ_k w_k L_k``; the gradient of the
    GradNorm loss with respect to ``w`` (only) is added to ``weights.grad``, so give
    ``balancer.parameters()`` to the optimizer, which steps the weights with the model. The
    weights are renormalised to sum to K (after clamping them at ``1e-8``, which keeps them
    positive) at the start of the next call, which is what the paper does after each step; the
    reported weights are the renormalised ones used in the step.

    ``W`` is the last tensor of ``shared_params`` with at least two dimensions (the weight of the
    last shared layer; its bias is left out), or the last tensor when none has two. The per-task
    gradients of ``W`` come from one batched backward (exact: ``G_k`` is linear in ``w_k``, so no
    second-order backward is needed). ``L_k(0)`` is task k's loss the first time it is present
    (buffer ``initial_losses``). Absent tasks get weight 0 in the step and no GradNorm gradient;
    the averages run over the present tasks.

    Args:
        tasks: the tasks, in the order of the losses.
        alpha: the asymmetry ``α`` (0: equal gradient norms; larger: stronger pull of the slow
            tasks).

    Example:
        >>> w = torch.nn.Parameter(torch.tensor([[2.0, 5.0]]))
        >>> g = GradNorm(["a", "b"], alpha=1.5)
        >>> result = g.backward(torch.stack([3 * w[0, 0], w[0, 1]]), shared_params=[w])
        >>> result.weights.tolist(), g.weights.grad.tolist()  # G = (3, 1) vs target (2, 2)
        ([1.0, 1.0], [3.0, -1.0])
    """

    needs_shared_params: ClassVar[bool] = True
    requires_positive_losses: ClassVar[bool] = True
    initial_losses: Tensor
    has_initial: Tensor

    def __init__(self, tasks: Sequence[TaskSpec | str], *, alpha: float = 1.5) -> None:
        super().__init__(tasks)
        if not alpha >= 0:
            raise ConfigError(f"gradnorm: alpha must be >= 0, found {alpha!r}")
        self.alpha = float(alpha)
        k = self.num_tasks
        self.weights = nn.Parameter(torch.ones(k))
        self.register_buffer("initial_losses", torch.zeros(k))
        self.register_buffer("has_initial", torch.zeros(k, dtype=torch.bool))

    @staticmethod
    def shared_layer(shared_params: Sequence[Tensor]) -> Tensor:
        """The tensor GradNorm measures gradient norms on: the last one with >= 2 dimensions."""
        matrices = [p for p in shared_params if p.dim() >= 2]
        return matrices[-1] if matrices else shared_params[-1]

    @torch.no_grad()
    def renormalise(self) -> None:
        """Clamp the weights at 1e-8 and rescale them to sum to K (done at each call)."""
        clamped = self.weights.clamp_min(_EPS)
        self.weights.copy_(clamped * (self.num_tasks / clamped.sum()))

    def backward(
        self,
        losses: Mapping[str, Tensor] | Sequence[Tensor] | Tensor,
        *,
        shared_params: Sequence[Tensor] | None = None,
        features: Tensor | None = None,
        present: Tensor | None = None,
    ) -> BalanceResult:
        vector = stack_losses(self.task_names, losses)
        if not shared_params:
            raise ValueError("GradNorm needs shared_params= (the shared parameters)")
        if present is None:
            present = torch.ones_like(vector, dtype=torch.bool)
        self.renormalise()
        layer = self.shared_layer(list(shared_params))
        (block,) = task_jacobian(vector, [layer], retain_graph=True)
        if self.reducer is not None and block is not None:  # the global per-task gradients
            block = self.reducer.mean(block)
        weights = self.weights
        if block is None:
            norms = torch.zeros_like(weights)
        else:
            norms = block.reshape(self.num_tasks, -1).norm(dim=1).to(weights.dtype)
        norms = _zero_absent(norms, present)
        detached = vector.detach().to(weights.dtype)
        if self.reducer is not None:  # the global loss values (the surrogates' mean)
            detached = self.reducer.mean(detached)
        with torch.no_grad():
            first = present & ~self.has_initial
            self.initial_losses.copy_(torch.where(first, detached, self.initial_losses))
            self.has_initial |= present
        count = present.sum().clamp_min(1).to(weights.dtype)
        rates = _zero_absent(detached / self.initial_losses.clamp_min(_EPS), present)
        inverse_rates = rates / (rates.sum() / count).clamp_min(_EPS)
        grad_norms = weights * norms
        target = (_zero_absent(grad_norms, present).sum() / count) * inverse_rates.pow(self.alpha)
        gradnorm_loss = _zero_absent((grad_norms - target.detach()).abs(), present).sum()
        (weights_grad,) = torch.autograd.grad(gradnorm_loss, weights)
        if weights.grad is None:
            weights.grad = weights_grad.detach()
        else:
            weights.grad.add_(weights_grad)
        used = _zero_absent(weights.detach(), present).to(vector.dtype)
        total = _zero_absent(used * vector, present).sum()
        total.backward()
        return BalanceResult(
            weights=used,
            loss=total.detach(),
            extras={
                "gradnorm_loss": gradnorm_loss.detach(),
                "grad_norms": grad_norms.detach(),
                "target_norms": target.detach(),
            },
        )


# --------------------------------------------------------------------------- IMTL-L
@BALANCERS.register(
    "imtl_l", "learned loss scales making every scaled loss equal (IMTL-L, Liu et al., ICLR 2021)"
)
class IMTLL(LossWeighting):
    """IMTL-L, the loss-balance part of Impartial Multi-Task Learning (Liu, Li, Kuang, Xue, Chen,
    Yang, Liao & Zhang, "Towards Impartial Multi-task Learning", ICLR 2021).

    Each task has a learnable log-scale ``s_k`` (initial value ``init_log_scale``); the combined
    loss is ``Σ_k e^{s_k} L_k - s_k`` over the present tasks and the weights are ``e^{s_k}``.
    For a fixed loss, ``∂/∂s_k = e^{s_k} L_k - 1`` vanishes at ``e^{s_k} L_k = 1``: the scales
    drive every scaled loss to 1. The log-scales are parameters: give ``balancer.parameters()`` to
    the optimizer. Losses should be positive.

    Example:
        >>> imtl = IMTLL(["a", "b"])
        >>> total, w = imtl.combine(torch.tensor([2.0, 0.5]), torch.tensor([True, True]))
        >>> float(total.detach()), w.tolist()   # e^0 * 2 - 0 + e^0 * 0.5 - 0
        (2.5, [1.0, 1.0])
    """

    requires_positive_losses: ClassVar[bool] = True

    def __init__(self, tasks: Sequence[TaskSpec | str], *, init_log_scale: float = 0.0) -> None:
        super().__init__(tasks)
        self.log_scales = nn.Parameter(torch.full((self.num_tasks,), float(init_log_scale)))

    def combine(self, losses: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:
        log_scales = self.log_scales.to(losses.dtype)
        weights = _zero_absent(torch.exp(log_scales), present)
        total = _zero_absent(weights * losses - log_scales, present).sum()
        return total, weights


# --------------------------------------------------------------------------- FAMO
@BALANCERS.register(
    "famo", "fast adaptive multitask optimization, balanced log-loss decrease (Liu et al., 2023)"
)
class FAMO(LossWeighting):
    """FAMO (Liu, Liu, Stone & Liu, "FAMO: Fast Adaptive Multitask Optimization", NeurIPS 2023,
    Algorithm 1).

    Logits ``ξ`` (buffer, initially 0) give ``z = softmax(ξ)`` over the present tasks. The step
    follows ``d = c Σ_k z_k ∇ log L_k`` with ``c = (Σ_k z_k / L_k)^{-1}``: the combined loss is
    ``c · Σ_k z_k log(L_k + ε)`` (``c`` held constant, ``ε = 1e-8``; its value can be negative),
    i.e. the gradient of ``Σ_k w_k L_k`` with the reported weights
    ``w_k = c z_k / (L_k + ε)`` (they sum to 1). Losses are assumed non-negative with minimum 0.

    The logits then move towards the tasks whose log-loss decreased least:
    ``δ = ∇_ξ Σ_k z_k (log L_k(before) - log L_k(after))`` (through the softmax Jacobian:
    ``δ_k = z_k (Δ_k - Σ_i z_i Δ_i)``) and ``ξ ← ξ - β (δ + γ ξ)``, over the tasks present at both
    times. The paper measures ``L(after)`` on the same batch after the optimizer step, at the
    cost of a forward pass; by default (and in the Trainer) this balancer uses the cheaper
    variant of LibMTL and the FAMO code: at each call it first updates ``ξ`` from the previous
    call's losses (buffer ``previous_losses``) and the current ones, then weights. A loop that
    wants the paper's exact algorithm calls ``update(losses_after)`` with the same batch's losses
    after each optimizer step (the next call then skips its own update).

    Args:
        tasks: the tasks, in the order of the losses.
        beta: the logits' learning rate ``β``.
        gamma: the logits' weight decay ``γ``.

    Example:
        >>> famo = FAMO(["a", "b"])
        >>> total, w = famo.combine(torch.tensor([1.0, 4.0]), torch.tensor([True, True]))
        >>> [round(v, 6) for v in w.tolist()]   # z = (.5, .5); c = 1 / (.5 + .125) = 1.6
        [0.8, 0.2]
    """

    requires_positive_losses: ClassVar[bool] = True
    logits: Tensor
    previous_losses: Tensor
    previous_present: Tensor

    def __init__(
        self, tasks: Sequence[TaskSpec | str], *, beta: float = 0.025, gamma: float = 0.001
    ) -> None:
        super().__init__(tasks)
        if not beta > 0:
            raise ConfigError(f"famo: beta must be > 0, found {beta!r}")
        if not gamma >= 0:
            raise ConfigError(f"famo: gamma must be >= 0, found {gamma!r}")
        self.beta = float(beta)
        self.gamma = float(gamma)
        k = self.num_tasks
        self.register_buffer("logits", torch.zeros(k))
        self.register_buffer("previous_losses", torch.zeros(k))
        self.register_buffer("previous_present", torch.zeros(k, dtype=torch.bool))

    def combine(self, losses: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:
        detached = losses.detach()
        self._step_logits(detached, present)
        with torch.no_grad():
            self.previous_losses.copy_(detached)
            self.previous_present.copy_(present)
        z = masked_softmax(self.logits.to(losses.dtype), present)
        shifted = torch.where(present, losses.clamp_min(0) + _EPS, torch.ones_like(losses))
        ratios = _zero_absent(z / shifted.detach(), present)
        c = 1.0 / ratios.sum().clamp_min(_tiny(losses.dtype))
        total = (c * z * torch.log(shifted)).sum()
        return total, c * ratios

    def update(
        self,
        losses_after: Mapping[str, Tensor] | Sequence[Tensor] | Tensor,
        present: Tensor | None = None,
    ) -> None:
        """The paper's exact logit update: ``losses_after`` are the same batch's losses after the
        optimizer step (``present`` defaults to the tasks present in the last call)."""
        after = stack_losses(self.task_names, losses_after).detach()
        if present is None:
            present = self.previous_present.clone()
        self._step_logits(after, present)
        with torch.no_grad():
            self.previous_present.zero_()

    @torch.no_grad()
    def _step_logits(self, after: Tensor, present: Tensor) -> None:
        both = self.previous_present & present
        before = self.previous_losses
        after = after.to(before.dtype)
        delta = torch.log(before.clamp_min(0) + _EPS) - torch.log(after.clamp_min(0) + _EPS)
        delta = _zero_absent(delta, both)
        z = masked_softmax(self.logits, both)
        direction = z * (delta - (z * delta).sum())
        stepped = self.logits - self.beta * (direction + self.gamma * self.logits)
        self.logits.copy_(torch.where(both.any(), stepped, self.logits))
