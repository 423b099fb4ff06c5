"""A training step captured in a CUDA graph and replayed (``train.cuda_graph``).

A small model's step on a GPU is bound by kernel launches, not arithmetic: the forward, the
masked per-task losses, the backward, clipping and the optimizer are a hundred or more small
kernels, each costing the host microseconds to launch while the GPU waits. ``GraphedStep``
records the whole step once with ``torch.cuda.graph`` and then replays it with one launch; the
batch is copied into the graph's input buffers first. What each replay computes is what the
eager step computes (the same kernels on the same tensors), so a graphed run follows the eager
run of the same configuration.

How it goes: the first ``warmup`` full-size steps run eagerly on a side stream (lazy
initialisation, the optimizer's state), the next one is captured and replayed, and every later
step of that shape is a replay. A batch of another shape (the epoch's last, shorter batch) runs
eagerly, outside the graph.

What it needs (``check_graphable``, one ``ConfigError`` line naming ``train.cuda_graph``): a
CUDA device, one process, one micro-batch per step, fp32 or bf16, no ``torch.compile``,
``train.nonfinite: stop``, no gradient diagnostics, a balancer whose step is device work only
(``Balancer.captures_in_cuda_graph``: the loss weightings that keep no host state), and AdamW.
The optimizer runs with ``capturable=True`` and its learning rates become device tensors, so a
schedule's new rate reaches the replayed step; ``plain_state`` gives the optimizer state with
plain floats back, so a checkpoint resumes with or without the graph.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from polytask.balancing import BALANCERS
from polytask.errors import ConfigError

__all__ = ["GraphedStep", "check_graphable"]

StepBody = Callable[[Any, Mapping[str, Tensor]], tuple[Tensor, ...]]


def check_graphable(
    *,
    device: torch.device,
    world_size: int,
    accumulate_steps: int,
    precision: str,
    compiled: bool,
    nonfinite: str,
    diagnostics: bool,
    balancer: Any,
    optimizer: torch.optim.Optimizer,
) -> None:
    """``ConfigError`` naming ``train.cuda_graph`` and the first requirement not met."""
    names = {entry.builder: entry.name for entry in BALANCERS}
    method = names.get(type(balancer), type(balancer).__name__)
    graphable = [name for builder, name in names.items() if _captures(builder)]
    problems = [
        (device.type != "cuda", f"needs a CUDA device (the device is {device})"),
        (world_size != 1, "runs one process (not under torchrun)"),
        (accumulate_steps != 1, "needs train.accumulate_steps: 1"),
        (precision not in ("fp32", "bf16"), "needs train.precision fp32 or bf16"),
        (compiled, "and train.compile exclude each other"),
        (nonfinite != "stop", "needs train.nonfinite: stop"),
        (diagnostics, "does not record balancing.diagnostics"),
        (
            not _captures(balancer),
            f"needs a balancing method whose step is device work only, not {method!r} "
            f"(one of {', '.join(sorted(graphable))})",
        ),
        (
            not isinstance(optimizer, torch.optim.AdamW),
            f"needs optimizer.name: adamw, not {type(optimizer).__name__}",
        ),
    ]
    for failed, reason in problems:
        if failed:
            raise ConfigError(f"train.cuda_graph {reason}")


def _captures(balancer: Any) -> bool:
    return bool(getattr(balancer, "captures_in_cuda_graph", False))


def _tensors(tree: Any) -> list[Tensor]:
    """The tensors of a batch part (a tensor, or a mapping or sequence of them), in order."""
    if isinstance(tree, Tensor):
        return [tree]
    if isinstance(tree, Mapping):
        return [t for key in sorted(tree) for t in _tensors(tree[key])]
    if isinstance(tree, (list, tuple)):
        return [t for item in tree for t in _tensors(item)]
    return []


def _signature(x: Any, y: Mapping[str, Tensor]) -> tuple[Any, ...]:
    return tuple((t.shape, t.dtype, t.device) for t in _tensors((x, y)))


def _copy_into(static: Any, batch: Any) -> None:
    """Copy ``batch`` into the graph's input buffers ``static`` (the same structure)."""
    for target, source in zip(_tensors(static), _tensors(batch), strict=True):
        target.copy_(source, non_blocking=True)


def _clone(tree: Any) -> Any:
    if isinstance(tree, Tensor):
        return tree.clone()
    if isinstance(tree, Mapping):
        return {key: _clone(value) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_clone(item) for item in tree)
    return tree


class GraphedStep:
    """Runs ``body(x, y)`` — one whole training step: zero the gradients, forward, losses,
    backward, clip, optimizer step; returning device tensors — eagerly for ``warmup`` steps,
    then as replays of one CUDA graph for every batch of the captured shape.

    Args:
        body: the step; it must do device work only (no host sync, no host state).
        optimizer: the step's optimizer (AdamW): switched to ``capturable`` with device
            learning rates at the first call.
        params: the parameters the step updates (their gradients are returned).
        warmup: eager steps before the capture.
    """

    def __init__(
        self,
        body: StepBody,
        optimizer: torch.optim.Optimizer,
        params: Sequence[Tensor],
        *,
        warmup: int = 3,
    ) -> None:
        self.body, self.optimizer, self.params, self.warmup = body, optimizer, params, warmup
        self.replays = 0
        self._graph: torch.cuda.CUDAGraph | None = None
        self._signature: tuple[Any, ...] | None = None
        self._warmed = 0
        self._static: Any = None
        self._outputs: tuple[Tensor, ...] = ()
        self._grads: list[Tensor] = []
        self._lrs: list[Tensor] = []
        self._capturable: list[Any] = []

    def __call__(self, x: Any, y: Mapping[str, Tensor]) -> tuple[tuple[Tensor, ...], list[Tensor]]:
        """One step on ``(x, y)``: (the body's outputs, the gradients the step applied)."""
        if not self._lrs:
            self._prepare_optimizer()
        signature = _signature(x, y)
        if self._graph is not None and signature == self._signature:
            _copy_into(self._static, (x, y))
            self._graph.replay()
            self.replays += 1
            return self._outputs, self._grads
        if self._graph is None and self._signature in (None, signature):
            self._signature = signature
            if self._warmed < self.warmup:
                self._warmed += 1
                return self._on_side_stream(x, y), self._current_grads()
            return self._capture(x, y)
        return self.body(x, y), self._current_grads()  # another shape: eagerly

    def reset(self) -> None:
        """Forget the graph (which parameters train changed): warm up and capture again."""
        self._graph, self._signature, self._warmed = None, None, 0
        self._static, self._outputs, self._grads = None, (), []

    def sync_learning_rates(self) -> None:
        """After a schedule's step: make sure each group's rate is the device tensor the graph
        reads (a schedule that wrote a float, as older PyTorch does, is copied into it)."""
        for group, lr in zip(self.optimizer.param_groups, self._lrs, strict=False):
            if group["lr"] is not lr:
                lr.fill_(float(group["lr"]))
                group["lr"] = lr

    def plain_state(self, state: dict[str, Any]) -> dict[str, Any]:
        """``optimizer.state_dict()`` with the learning rates as floats and ``capturable`` as
        before the graph: a checkpoint that resumes with or without ``train.cuda_graph``."""
        if not self._lrs:
            return state
        groups = [
            {**group, "lr": float(group["lr"]), "capturable": capturable}
            for group, capturable in zip(state["param_groups"], self._capturable, strict=True)
        ]
        return {**state, "param_groups": groups}

    def _prepare_optimizer(self) -> None:
        """``capturable`` AdamW with device learning rates, its step counts on the device."""
        self._capturable = [group.get("capturable", False) for group in self.optimizer.param_groups]
        for group in self.optimizer.param_groups:
            device = group["params"][0].device
            group["capturable"] = True
            group["lr"] = torch.as_tensor(float(group["lr"]), dtype=torch.float32, device=device)
            self._lrs.append(group["lr"])
            for param in group["params"]:
                state = self.optimizer.state.get(param, {})
                if isinstance(state.get("step"), Tensor):
                    state["step"] = state["step"].to(param.device, torch.float32)

    def _current_grads(self) -> list[Tensor]:
        return [p.grad for p in self.params if p.grad is not None]

    def _on_side_stream(self, x: Any, y: Mapping[str, Tensor]) -> tuple[Tensor, ...]:
        """An eager step on a side stream (what ``torch.cuda.graph`` expects before capture)."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            outputs = self.body(x, y)
        torch.cuda.current_stream().wait_stream(side)
        return outputs

    def _capture(self, x: Any, y: Mapping[str, Tensor]) -> tuple[tuple[Tensor, ...], list[Tensor]]:
        """Capture the step on static copies of ``(x, y)``, then replay it for this batch."""
        self._static = _clone((x, y))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._outputs = self.body(*self._static)
        self._grads = self._current_grads()
        self._graph = graph
        graph.replay()
        self.replays += 1
        return self._outputs, self._grads
