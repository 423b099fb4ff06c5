"""Mixture-of-experts architectures: MMoE, CGC and PLE, with softmax or DSelect-k gates.

Every expert is an encoder (``make_encoder()``); a *gate* maps an input to weights over experts
(``[B, num_experts]``, non-negative, summing to 1) and each task's tower (its head) reads the
gate-weighted sum of the expert outputs. Gates are registered in ``GATES`` by name (``softmax``,
``dselect_k``) and return ``(weights, penalty)``: ``penalty`` is a scalar regularisation term or
``None``. A model whose gates return penalties reports their sum as ``extras["aux_loss"]``: add it
to the objective (it only touches gate parameters).

The gates read the flattened input; its width is found on the first expert (the image shape of a
cnn/resnet encoder, the first linear layer of an mlp, ``in_features`` where an encoder declares
it) or given as ``input_features``. A dict input (e.g. ``{"numeric", "categorical"}`` for the
``tabular`` encoder) has no flat form: the gates read an expert's ``embed(x)`` instead (MMoE: the
first expert; CGC/PLE: the first shared expert of the level), with the gradient stopped — the
embedding tables are trained by the experts, the gates only read them.

``features`` is built with ``join_features`` so that it is a *cut* of the autograd graph: every
path from a shared parameter to a task's loss passes through it, and no task parameter lies below
it. Representation-level balancing (``level="features"``) then updates the shared parameters
exactly as a parameter-level method would for the same task weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn

from polytask.errors import ConfigError, unknown_name
from polytask.models.architectures import (
    ARCHITECTURES,
    EncoderFactory,
    HeadFactory,
    MultiTaskModel,
    MultiTaskOutput,
)
from polytask.models.encoders import MLPEncoder
from polytask.registry import Registry
from polytask.tasks import TaskSpec

__all__ = [
    "CGC",
    "GATES",
    "PLE",
    "DSelectKGate",
    "MMoE",
    "SoftmaxGate",
    "join_features",
    "smooth_step",
]

GATES: Registry = Registry("gate", provided=("in_features", "num_experts"))

GateFactory = Callable[[int, int], nn.Module]


# --------------------------------------------------------------------------- helpers


def join_features(tensors: Sequence[Tensor]) -> tuple[Tensor, list[Tensor]]:
    """One ``[B, N]`` features tensor from several ``[B, ...]`` tensors, and views of it with the
    original shapes.

    A model computes its shared part first, joins every tensor that the task-specific part reads,
    and lets the task-specific part read the *views*: the joined tensor is then a cut of the graph
    (the gradient of a loss with respect to it carries everything the shared part receives).

    Example:
        >>> a, b = torch.ones(2, 3), torch.zeros(2, 2, 2)
        >>> features, (va, vb) = join_features([a, b])
        >>> features.shape, va.shape, vb.shape
        (torch.Size([2, 7]), torch.Size([2, 3]), torch.Size([2, 2, 2]))
    """
    flat = torch.cat([t.flatten(1) for t in tensors], dim=1)
    sizes = [math.prod(t.shape[1:]) for t in tensors]
    views = [v.reshape(t.shape) for v, t in zip(flat.split(sizes, dim=1), tensors, strict=True)]
    return flat, views


def _gate_input(x: Tensor | Mapping[str, Tensor], embedder: nn.Module | None = None) -> Tensor:
    """What a gate reads: the flattened input, as floats (inputs may be integer ids).

    A dict input (named blocks, e.g. numeric features and categorical codes) has no flat form:
    the gate reads ``embedder.embed(x)`` (an encoder with an ``embed`` method, such as the
    ``tabular`` encoder: its input layer with the categorical embeddings) with the gradient
    stopped, so the gates stay task parameters and ``features`` stays a cut of the graph."""
    if isinstance(x, Mapping):
        embed = getattr(embedder, "embed", None)
        if embed is None:
            name = type(embedder).__name__ if embedder is not None else "None"
            raise ConfigError(
                f"the gates of expert models read a flat input; for dict inputs "
                f"({', '.join(x)}) the encoder needs an embed(x) method (e.g. the 'tabular' "
                f"encoder), found {name}"
            )
        return cast(Tensor, embed(x)).detach()
    flat = x.flatten(1)
    return flat if flat.is_floating_point() else flat.to(torch.get_default_dtype())


def _mix(experts: Tensor, weights: Tensor) -> Tensor:
    """Gate-weighted sum ``[B, F]`` of expert outputs ``[B, E, F]`` with weights ``[B, E]``."""
    return torch.einsum("be,bef->bf", weights.to(experts.dtype), experts)


def _out_features(encoder: nn.Module, owner: str) -> int:
    width = getattr(encoder, "out_features", None)
    if not isinstance(width, int):
        raise ConfigError(
            f"{owner}: the encoder {type(encoder).__name__} has no integer out_features"
        )
    return width


def _input_width(encoder: nn.Module, input_features: int | None, owner: str) -> int:
    """Width of the flattened input the gates read: ``input_features`` if given, else found on
    the encoder (image shape, or the first parametrised layer when it is linear)."""
    if input_features is not None:
        if input_features < 1:
            raise ConfigError(f"{owner}: input_features must be >= 1, found {input_features}")
        return int(input_features)
    image = getattr(encoder, "_image", None)
    if image is not None:
        return math.prod(int(d) for d in image)
    declared = getattr(encoder, "in_features", None)
    if isinstance(declared, int):
        return declared
    for module in encoder.modules():
        if next(module.parameters(recurse=False), None) is not None:
            if isinstance(module, nn.Linear):
                return module.in_features
            break
    raise ConfigError(
        f"{owner}: cannot tell the input width of a {type(encoder).__name__} encoder for the "
        "gates; set input_features (the number of values in one flattened input)"
    )


def _gate_factory(gate: str, options: Mapping[str, Any]) -> GateFactory:
    """``(in_features, num_experts) -> gate`` passing each gate only the options it accepts."""
    builder = GATES.get(gate)
    accepted = GATES.parameters(gate)
    kwargs = {key: value for key, value in options.items() if key in accepted}

    def make_gate(in_features: int, num_experts: int) -> nn.Module:
        return builder(in_features, num_experts, **kwargs)  # type: ignore[no-any-return]

    return make_gate


def _gate_problems(gate: str, k: int, gamma: float, entropy_reg: float) -> list[str]:
    problems = []
    if gate not in GATES:
        problems.append(unknown_name("gate", gate, GATES.names()))
    if k < 1:
        problems.append(f"k must be >= 1, found {k}")
    if not gamma > 0:
        problems.append(f"gamma must be > 0, found {gamma}")
    if not entropy_reg >= 0:
        problems.append(f"entropy_reg must be >= 0, found {entropy_reg}")
    return problems


def _raise(owner: str, problems: list[str]) -> None:
    if problems:
        raise ConfigError(f"{owner}: " + "; ".join(problems))


def _extras(gates: dict[str, Tensor], penalties: list[Tensor], **more: Any) -> dict[str, Any]:
    extras: dict[str, Any] = {"gates": gates, **more}
    if penalties:
        extras["aux_loss"] = torch.stack(penalties).sum()
    return extras


# --------------------------------------------------------------------------- gates


@GATES.register("softmax", "a linear layer and a softmax over the experts (Ma et al., KDD 2018)")
class SoftmaxGate(nn.Module):
    """The MMoE gate: ``softmax(W x + b)`` over the experts.

    Example:
        >>> gate = SoftmaxGate(4, 3)
        >>> weights, penalty = gate(torch.randn(2, 4))
        >>> weights.shape, torch.allclose(weights.sum(-1), torch.ones(2)), penalty
        (torch.Size([2, 3]), True, None)
    """

    def __init__(self, in_features: int, num_experts: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.linear = nn.Linear(in_features, num_experts)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        return torch.softmax(self.linear(x), dim=-1), None


def _wide(t: Tensor) -> Tensor:
    """``t`` in float32 at least (gate arithmetic stays exact under mixed precision)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def smooth_step(t: Tensor, gamma: float = 1.0) -> Tensor:
    """The smooth-step function of DSelect-k (Hazimeh et al., NeurIPS 2021, eq. 1): 0 below
    ``-gamma/2``, 1 above ``gamma/2``, the cubic ``-2t³/γ³ + 3t/(2γ) + 1/2`` in between
    (continuously differentiable).

    Example:
        >>> smooth_step(torch.tensor([-1.0, 0.0, 0.25, 1.0])).tolist()
        [0.0, 0.5, 0.84375, 1.0]
    """
    cubic = (-2.0 / gamma**3) * t**3 + (3.0 / (2.0 * gamma)) * t + 0.5
    return torch.where(
        t <= -gamma / 2, torch.zeros_like(t), torch.where(t >= gamma / 2, torch.ones_like(t), cubic)
    )


@GATES.register("dselect_k", "differentiable selection of k experts (Hazimeh et al., NeurIPS 2021)")
class DSelectKGate(nn.Module):
    """DSelect-k, per-example (Hazimeh, Zhao, Chowdhery, Sathiamoorthy, Chen, Mazumder, Hong &
    Chi, "DSelect-k: Differentiable Selection in the Mixture of Experts with Applications to
    Multi-Task Learning", NeurIPS 2021).

    ``k`` single-expert selectors each choose one expert through a binary code of
    ``m = ceil(log2 n)`` bits: selector ``i`` turns ``m`` logits ``z_i(x)`` into bits
    ``q = smooth_step(z_i, gamma)`` and gives expert ``l`` the weight
    ``r_il = prod_j (q_j if bit j of l else 1 - q_j)``, a distribution over the ``2^m`` codes. The
    gate is ``sum_i softmax(w(x))_i r_i``. Once the logits leave ``[-gamma/2, gamma/2]`` every
    selector is one-hot, so at most ``k`` experts have a non-zero weight; the weights always sum
    to 1. Logits start in ``±gamma/100`` (every expert active, as in the paper's code).

    ``entropy_reg > 0`` returns the penalty ``entropy_reg * mean_b sum_i H(r_i)`` that pushes the
    selectors to converge (the paper's entropy regulariser). When ``n`` is not a power of two, the
    paper's code adds a penalty keeping selectors off the unused codes; here the unused code
    ``c >= n`` is folded onto expert ``c - n`` instead, so every code is a real expert and the
    weights sum to 1 without a penalty.

    Example:
        >>> gate = DSelectKGate(4, 5, k=2)
        >>> weights, _ = gate(torch.randn(3, 4))
        >>> weights.shape, torch.allclose(weights.sum(-1), torch.ones(3))
        (torch.Size([3, 5]), True)
    """

    codes: Tensor
    code_to_expert: Tensor

    def __init__(
        self,
        in_features: int,
        num_experts: int,
        *,
        k: int = 2,
        gamma: float = 1.0,
        entropy_reg: float = 0.0,
    ) -> None:
        super().__init__()
        _raise("dselect_k gate", _gate_problems("dselect_k", k, gamma, entropy_reg))
        if num_experts < 1:
            raise ConfigError(f"dselect_k gate: num_experts must be >= 1, found {num_experts}")
        self.num_experts = num_experts
        self.k = k
        self.gamma = float(gamma)
        self.entropy_reg = float(entropy_reg)
        self.num_binary = max(1, math.ceil(math.log2(num_experts)))
        m, n = self.num_binary, num_experts
        codes = [[bool((c >> (m - 1 - j)) & 1) for j in range(m)] for c in range(2**m)]
        self.register_buffer("codes", torch.tensor(codes, dtype=torch.bool), persistent=False)
        folded = [c if c < n else c - n for c in range(2**m)]
        self.register_buffer("code_to_expert", torch.tensor(folded), persistent=False)
        self.selector_logits = nn.Linear(in_features, k * m)
        self.selector_weights = nn.Linear(in_features, k)
        for param in self.selector_logits.parameters():
            nn.init.uniform_(param, -self.gamma / 100, self.gamma / 100)
        for param in self.selector_weights.parameters():
            nn.init.uniform_(param, -0.05, 0.05)

    def selectors(self, x: Tensor) -> Tensor:
        """Each selector's distribution over the experts, ``[B, k, num_experts]``."""
        z = _wide(self.selector_logits(x)).view(x.shape[0], self.k, 1, self.num_binary)
        q = smooth_step(z, self.gamma)
        r = torch.where(self.codes, q, 1 - q).prod(dim=-1)  # [B, k, 2^m]
        if r.shape[-1] != self.num_experts:
            r = r.new_zeros(x.shape[0], self.k, self.num_experts).index_add(
                -1, self.code_to_expert, r
            )
        return r

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        r = self.selectors(x)
        alpha = torch.softmax(_wide(self.selector_weights(x)), dim=-1)  # [B, k]
        weights = (alpha.unsqueeze(-1) * r).sum(dim=1)  # no matmul: stays float32 under autocast
        penalty = None
        if self.entropy_reg > 0:
            entropy = -(r * torch.log(r + 1e-6)).sum(dim=-1)  # [B, k]
            penalty = self.entropy_reg * entropy.sum(dim=-1).mean()
        return weights, penalty


# --------------------------------------------------------------------------- MMoE


@ARCHITECTURES.register(
    "mmoe", "multi-gate mixture of experts, one gate per task (Ma et al., KDD 2018)"
)
class MMoE(MultiTaskModel):
    """Multi-gate Mixture-of-Experts (Ma, Zhao, Yi, Chen, Hong & Chi, "Modeling Task
    Relationships in Multi-task Learning with Multi-gate Mixture-of-Experts", KDD 2018).

    ``num_experts`` experts (each ``make_encoder()``) are shared by every task; task ``k`` has its
    own gate over them (``gate``: ``softmax`` as in the paper, or ``dselect_k`` with ``k``,
    ``gamma``, ``entropy_reg``, which the softmax gate ignores) reading the flattened input, and its
    tower (the head) reads ``sum_e gate_k(x)_e expert_e(x)``.

    * ``shared_parameters()``: the experts (every task reads every expert through its gate); the
      gates and the heads belong to one task each.
    * ``features``: the concatenated expert outputs ``[B, num_experts * width]``.
    * ``extras["gates"]``: ``{task: [B, num_experts]}``; ``extras["aux_loss"]`` when the gates
      are regularised.

    Example:
        >>> from polytask.models.encoders import MLPEncoder
        >>> from polytask.models.heads import linear_head
        >>> tasks = [TaskSpec("a", "binary"), TaskSpec("b", "multiclass", num_classes=3)]
        >>> model = MMoE(tasks=tasks, make_encoder=lambda: MLPEncoder((6,), hidden=(8,)),
        ...              make_head=lambda task, width: linear_head(width, task), num_experts=3)
        >>> out = model(torch.randn(5, 6))
        >>> out.outputs["a"].shape, out.outputs["b"].shape, out.features.shape
        (torch.Size([5]), torch.Size([5, 3]), torch.Size([5, 24]))
        >>> out.extras["gates"]["b"].shape
        torch.Size([5, 3])
    """

    def __init__(
        self,
        *,
        tasks: Sequence[TaskSpec],
        make_encoder: EncoderFactory,
        make_head: HeadFactory,
        num_experts: int = 4,
        gate: str = "softmax",
        k: int = 2,
        gamma: float = 1.0,
        entropy_reg: float = 0.0,
        input_features: int | None = None,
    ) -> None:
        super().__init__()
        problems = _gate_problems(gate, k, gamma, entropy_reg)
        if num_experts < 1:
            problems.append(f"num_experts must be >= 1, found {num_experts}")
        if not tasks:
            problems.append("needs at least one task")
        _raise("mmoe", problems)
        self.tasks = list(tasks)
        self.experts = nn.ModuleList(make_encoder() for _ in range(num_experts))
        width = _out_features(self.experts[0], "mmoe")
        in_width = _input_width(self.experts[0], input_features, "mmoe")
        make_gate = _gate_factory(gate, {"k": k, "gamma": gamma, "entropy_reg": entropy_reg})
        self.gates = nn.ModuleDict({t.name: make_gate(in_width, num_experts) for t in self.tasks})
        self.heads = nn.ModuleDict({t.name: make_head(t, width) for t in self.tasks})

    def forward(self, x: Tensor) -> MultiTaskOutput:
        features, (experts,) = join_features([torch.stack([e(x) for e in self.experts], dim=1)])
        flat = _gate_input(x, self.experts[0])
        outputs: dict[str, Tensor] = {}
        gates: dict[str, Tensor] = {}
        penalties: list[Tensor] = []
        for name, head in self.heads.items():
            weights, penalty = self.gates[name](flat)
            gates[name] = weights
            if penalty is not None:
                penalties.append(penalty)
            outputs[name] = head(_mix(experts, weights))
        return MultiTaskOutput(outputs, features, _extras(gates, penalties))

    def shared_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.experts.parameters() if p.requires_grad]


# --------------------------------------------------------------------------- CGC / PLE


class _ExtractionLevel(nn.Module):
    """One extraction layer of PLE: task-specific and shared experts, a gate per task over its
    own and the shared experts, and (inner levels) a shared gate over every expert."""

    def __init__(
        self,
        names: Sequence[str],
        *,
        make_expert: Callable[[], nn.Module],
        gate_width: int,
        experts_per_task: int,
        shared_experts: int,
        make_gate: GateFactory,
        shared_gate: bool,
    ) -> None:
        super().__init__()
        self.task_experts = nn.ModuleDict(
            {n: nn.ModuleList(make_expert() for _ in range(experts_per_task)) for n in names}
        )
        self.shared_experts = nn.ModuleList(make_expert() for _ in range(shared_experts))
        own = experts_per_task + shared_experts
        self.task_gates = nn.ModuleDict({n: make_gate(gate_width, own) for n in names})
        everyone = len(names) * experts_per_task + shared_experts
        self.shared_gate: nn.Module | None = (
            make_gate(gate_width, everyone) if shared_gate else None
        )

    def run_task_experts(self, name: str, x: Tensor) -> Tensor:
        experts = cast(nn.ModuleList, self.task_experts[name])
        return torch.stack([e(x) for e in experts], dim=1)

    def run_shared_experts(self, x: Tensor) -> Tensor:
        return torch.stack([e(x) for e in self.shared_experts], dim=1)

    def mix_task(
        self, name: str, gate_input: Tensor, own: Tensor, shared: Tensor
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """(task ``name``'s output, its gate weights, gate penalty)."""
        weights, penalty = self.task_gates[name](_gate_input(gate_input, self.shared_experts[0]))
        return _mix(torch.cat([own, shared], dim=1), weights), weights, penalty

    def mix_shared(
        self, gate_input: Tensor, own: Mapping[str, Tensor], shared: Tensor
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """(the shared path's output, the shared gate's weights, gate penalty)."""
        assert self.shared_gate is not None
        weights, penalty = self.shared_gate(_gate_input(gate_input, self.shared_experts[0]))
        every = torch.cat([*own.values(), shared], dim=1)
        return _mix(every, weights), weights, penalty


@ARCHITECTURES.register(
    "ple", "progressive layered extraction: stacked CGC levels (Tang et al., RecSys 2020)"
)
class PLE(MultiTaskModel):
    """Progressive Layered Extraction (Tang, Liu, Zhao & Gong, "Progressive Layered Extraction
    (PLE): A Novel Multi-Task Learning (MTL) Model for Personalized Recommendations", RecSys 2020).

    Each of the ``num_levels`` extraction levels has ``experts_per_task`` experts per task and
    ``shared_experts`` shared experts. Task ``k``'s gate mixes its own and the shared experts; at
    every level but the last, a shared gate mixes *all* experts into the shared path. The experts
    of level 1 are ``make_encoder()`` encoders reading the input; those of level 2 and above read
    the previous level's outputs (task ``k``'s experts its path, shared experts the shared path)
    and are ``MLPEncoder((width,), hidden=(width,))`` with ``width`` the encoder's
    ``out_features``. Gates read their path's previous output (level 1: the flattened input).
    ``gate`` is ``softmax`` (the paper) or ``dselect_k`` (``k``, ``gamma``, ``entropy_reg``).
    CGC (``cgc``) is PLE with one level.

    * ``shared_parameters()``: the shared experts and shared gates of every level, plus what the
      shared gates make every task depend on: the task-specific experts of inner levels (a shared
      gate mixes them into the shared path) and the task gates of levels below the last two. The
      task-specific experts of the last level (all of CGC's) and the task gates of the last two
      levels count as task parameters, with the heads.
    * ``features``: what the shared part hands to the task-specific part, joined into
      ``[B, N]``: the outputs of the last level's shared experts (all of ``features`` for CGC);
      with two levels or more also every expert output of the level below the last and, from
      three levels, each task's path entering that level. This makes ``features`` a cut of the
      graph, so representation-level balancing updates the shared parameters correctly.
    * ``extras["gates"]``: each task's last-level gate, ``[B, experts_per_task +
      shared_experts]``; ``extras["level_gates"]``: a ``{task: weights}`` dict per level;
      ``extras["shared_gates"]``: the shared gates' weights per inner level.

    Example:
        >>> from polytask.models.encoders import MLPEncoder
        >>> from polytask.models.heads import linear_head
        >>> tasks = [TaskSpec("a", "binary"), TaskSpec("b", "regression")]
        >>> model = PLE(tasks=tasks, make_encoder=lambda: MLPEncoder((6,), hidden=(8,)),
        ...             make_head=lambda task, width: linear_head(width, task), shared_experts=2)
        >>> out = model(torch.randn(5, 6))
        >>> out.outputs["a"].shape, out.extras["gates"]["a"].shape, len(out.extras["level_gates"])
        (torch.Size([5]), torch.Size([5, 3]), 2)
    """

    _owner = "ple"

    def __init__(
        self,
        *,
        tasks: Sequence[TaskSpec],
        make_encoder: EncoderFactory,
        make_head: HeadFactory,
        num_levels: int = 2,
        experts_per_task: int = 1,
        shared_experts: int = 1,
        gate: str = "softmax",
        k: int = 2,
        gamma: float = 1.0,
        entropy_reg: float = 0.0,
        input_features: int | None = None,
    ) -> None:
        super().__init__()
        owner = self._owner
        problems = _gate_problems(gate, k, gamma, entropy_reg)
        for key, value in (
            ("num_levels", num_levels),
            ("experts_per_task", experts_per_task),
            ("shared_experts", shared_experts),
        ):
            if value < 1:
                problems.append(f"{key} must be >= 1, found {value}")
        if not tasks:
            problems.append("needs at least one task")
        _raise(owner, problems)
        self.tasks = list(tasks)
        names = [t.name for t in self.tasks]
        make_gate = _gate_factory(gate, {"k": k, "gamma": gamma, "entropy_reg": entropy_reg})
        probe = make_encoder()
        width = _out_features(probe, owner)
        in_width = _input_width(probe, input_features, owner)
        spare = [probe]  # the probe becomes the first expert

        def make_first_expert() -> nn.Module:
            return spare.pop() if spare else make_encoder()

        def make_inner_expert() -> nn.Module:
            return MLPEncoder((width,), hidden=(width,))

        levels = []
        for level in range(num_levels):
            levels.append(
                _ExtractionLevel(
                    names,
                    make_expert=make_first_expert if level == 0 else make_inner_expert,
                    gate_width=in_width if level == 0 else width,
                    experts_per_task=experts_per_task,
                    shared_experts=shared_experts,
                    make_gate=make_gate,
                    shared_gate=level < num_levels - 1,
                )
            )
        self.levels = nn.ModuleList(levels)
        self.heads = nn.ModuleDict({t.name: make_head(t, width) for t in self.tasks})

    def forward(self, x: Tensor) -> MultiTaskOutput:
        levels: list[_ExtractionLevel] = list(self.levels)  # type: ignore[arg-type]
        depth = len(levels)
        names = list(self.heads.keys())
        level_gates: list[dict[str, Tensor]] = [{} for _ in levels]
        shared_gates: list[Tensor] = []
        penalties: list[Tensor] = []

        def keep(weights: Tensor, penalty: Tensor | None) -> Tensor:
            if penalty is not None:
                penalties.append(penalty)
            return weights

        # 1. The shared part: every level below the last two, then the experts and the shared
        # gate of the level below the last, then the last level's shared experts.
        paths = {n: x for n in names}
        shared_path = x
        for i, level in enumerate(levels[: max(depth - 2, 0)]):
            own = {n: level.run_task_experts(n, paths[n]) for n in names}
            shared = level.run_shared_experts(shared_path)
            new_paths = {}
            for n in names:
                new_paths[n], w, p = level.mix_task(n, paths[n], own[n], shared)
                level_gates[i][n] = keep(w, p)
            shared_path, w, p = level.mix_shared(shared_path, own, shared)
            shared_gates.append(keep(w, p))
            paths = new_paths
        pieces: list[Tensor] = []
        if depth >= 2:
            below = levels[-2]
            own = {n: below.run_task_experts(n, paths[n]) for n in names}
            shared = below.run_shared_experts(shared_path)
            shared_path, w, p = below.mix_shared(shared_path, own, shared)
            shared_gates.append(keep(w, p))
            if depth >= 3:
                pieces += [paths[n] for n in names]
            pieces += [*own.values(), shared]
        last = levels[-1]
        pieces.append(last.run_shared_experts(shared_path))
        features, views = join_features(pieces)

        # 2. The task-specific part reads the views.
        if depth >= 2:
            if depth >= 3:
                paths = dict(zip(names, views[: len(names)], strict=True))
                views = views[len(names) :]
            own_views = dict(zip(names, views[: len(names)], strict=True))
            shared_view = views[len(names)]
            for n in names:
                paths[n], w, p = below.mix_task(n, paths[n], own_views[n], shared_view)
                level_gates[-2][n] = keep(w, p)
        last_shared = views[-1]
        outputs: dict[str, Tensor] = {}
        for n in names:
            own_last = last.run_task_experts(n, paths[n])
            mixed, w, p = last.mix_task(n, paths[n], own_last, last_shared)
            level_gates[-1][n] = keep(w, p)
            outputs[n] = self.heads[n](mixed)
        extras = _extras(
            dict(level_gates[-1]), penalties, level_gates=level_gates, shared_gates=shared_gates
        )
        return MultiTaskOutput(outputs, features, extras)

    def shared_parameters(self) -> list[nn.Parameter]:
        levels: list[_ExtractionLevel] = list(self.levels)  # type: ignore[arg-type]
        depth = len(levels)
        modules: list[nn.Module] = []
        for i, level in enumerate(levels):
            modules.append(level.shared_experts)
            if level.shared_gate is not None:
                modules.append(level.shared_gate)
            if i < depth - 1:
                modules.append(level.task_experts)
            if i < depth - 2:
                modules.append(level.task_gates)
        return [p for m in modules for p in m.parameters() if p.requires_grad]


@ARCHITECTURES.register(
    "cgc", "customized gate control: task and shared experts (Tang et al., RecSys 2020)"
)
class CGC(PLE):
    """Customized Gate Control (Tang, Liu, Zhao & Gong, "Progressive Layered Extraction (PLE): A
    Novel Multi-Task Learning (MTL) Model for Personalized Recommendations", RecSys 2020): PLE
    with a single extraction level. Each task has ``experts_per_task`` experts of its own, and a
    gate mixing them with the ``shared_experts`` shared experts.

    * ``shared_parameters()``: the shared experts; the task-specific experts and the gates are
      task parameters.
    * ``features``: the shared experts' outputs, ``[B, shared_experts * width]``.
    * ``extras["gates"]``: ``{task: [B, experts_per_task + shared_experts]}``.

    Example:
        >>> from polytask.models.encoders import MLPEncoder
        >>> from polytask.models.heads import linear_head
        >>> tasks = [TaskSpec("a", "binary"), TaskSpec("b", "regression")]
        >>> model = CGC(tasks=tasks, make_encoder=lambda: MLPEncoder((6,), hidden=(8,)),
        ...             make_head=lambda task, width: linear_head(width, task), experts_per_task=2)
        >>> out = model(torch.randn(5, 6))
        >>> out.outputs["b"].shape, out.features.shape, out.extras["gates"]["b"].shape
        (torch.Size([5]), torch.Size([5, 8]), torch.Size([5, 3]))
    """

    _owner = "cgc"

    def __init__(
        self,
        *,
        tasks: Sequence[TaskSpec],
        make_encoder: EncoderFactory,
        make_head: HeadFactory,
        experts_per_task: int = 1,
        shared_experts: int = 1,
        gate: str = "softmax",
        k: int = 2,
        gamma: float = 1.0,
        entropy_reg: float = 0.0,
        input_features: int | None = None,
    ) -> None:
        super().__init__(
            tasks=tasks,
            make_encoder=make_encoder,
            make_head=make_head,
            num_levels=1,
            experts_per_task=experts_per_task,
            shared_experts=shared_experts,
            gate=gate,
            k=k,
            gamma=gamma,
            entropy_reg=entropy_reg,
            input_features=input_features,
        )
