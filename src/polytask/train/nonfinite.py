"""Non-finite task losses and gradients: found on the device, acted on without a host sync per
step.

Every optimizer step, ``NonFiniteGuard`` adds each task's loss and the gradient norm (unless fp16
loss scaling is on: its ``GradScaler`` already skips such steps and lowers its scale) to running
sums on the device, which stay finite exactly as long as every step was; they are read where the
loop synchronises anyway: the progress-bar refresh and the end of the epoch.

* ``stop`` (the default): the run ends with ``NonFiniteError`` naming the tasks and the steps
  between the last check and this one. The optimizer has applied those steps, but the
  checkpoints on disk hold only epochs that ended finite, and a run can resume from its ``last``
  one (with ``train.nonfinite: skip``, say).
* ``skip``: a step that is not finite changes nothing: on the CPU it is simply not taken;
  elsewhere it is undone on the device (``torch.where`` between the state after the step and a
  copy taken before it: parameters, optimizer state, float buffers of the model and the
  balancer). Skipped steps are counted per epoch (``skipped_steps`` in ``metrics.jsonl``), and
  an epoch whose every step was skipped ends the run.

Example:
    >>> guard = NonFiniteGuard("stop", ["a", "b"], torch.device("cpu"), check_gradients=False)
    >>> guard.observe(torch.tensor([0.5, 0.25]), [], step=1)
    >>> guard.observe(torch.tensor([0.5, float("nan")]), [], step=2)
    >>> guard.peek()
    [1.0, nan, 0.0]
    >>> try:
    ...     guard.check(epoch=1)
    ... except NonFiniteError as exc:
    ...     print(str(exc).split(";")[0])
    train.nonfinite: non-finite loss of task 'b' at steps 1-2 (epoch 1)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from polytask.errors import PolytaskError
from polytask.runtime import Runtime
from polytask.tasks import TaskSpec

__all__ = ["NONFINITE_POLICIES", "NonFiniteError", "NonFiniteGuard", "StepSnapshot"]

#: what the Trainer does with a step whose loss or gradient is NaN or infinite
NONFINITE_POLICIES = ("stop", "skip")

_HINT = (
    "lower optimizer.lr, set train.grad_clip, check the data, or set train.nonfinite: skip to "
    "skip such steps"
)


class NonFiniteError(PolytaskError):
    """A task loss or the gradient was NaN or infinite (``train.nonfinite``)."""


class StepSnapshot:
    """A copy of the training state one optimizer step may change, to undo the step on the
    device where ``ok`` is false.

    Tensors are the optimizer's parameters and state (none without an ``optimizer``) and the
    float buffers of ``modules``, those on ``device``; optimizer state that the step creates
    (Adam's moments on the first step) is reset to zero, which is what the optimizer starts
    from. Tensors elsewhere (Adam's step count, kept on the host beside CUDA parameters) are
    left as they are: undoing them would need the flag on the host every step."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer | None,
        modules: Iterable[nn.Module],
        device: torch.device,
    ) -> None:
        self.optimizer = optimizer
        self.had_state = (
            set() if optimizer is None else {id(p) for p, s in optimizer.state.items() if s}
        )
        self.tensors = [t for t in _state_tensors(optimizer, modules) if _on(t, device)]
        with torch.no_grad():
            self.saved = [t.clone() for t in self.tensors]

    def restore_unless(self, ok: Tensor) -> None:
        """Put back the saved values where ``ok`` is false (no host sync)."""
        with torch.no_grad():
            for tensor, saved in zip(self.tensors, self.saved, strict=True):
                torch.where(ok, tensor, saved, out=tensor)
            if self.optimizer is None:
                return
            for param, state in self.optimizer.state.items():
                if id(param) in self.had_state:
                    continue
                for value in state.values():
                    if isinstance(value, Tensor) and _on(value, ok.device):
                        torch.where(ok, value, torch.zeros_like(value), out=value)


def _on(tensor: Tensor, device: torch.device) -> bool:
    """Whether ``tensor`` is on ``device`` (``cuda`` meaning the current CUDA device).

    >>> _on(torch.zeros(1), torch.device("cpu")), _on(torch.zeros(1), torch.device("cuda"))
    (True, False)
    """
    here = tensor.device
    if here.type != device.type:
        return False
    if here.index is None or device.index is None:
        current = torch.cuda.current_device() if device.type == "cuda" else 0
        return (here.index if here.index is not None else current) == (
            device.index if device.index is not None else current
        )
    return here.index == device.index


def _state_tensors(
    optimizer: torch.optim.Optimizer | None, modules: Iterable[nn.Module]
) -> list[Tensor]:
    tensors: list[Tensor] = []
    seen: set[int] = set()

    def add(t: Any) -> None:
        if isinstance(t, Tensor) and id(t) not in seen:
            seen.add(id(t))
            tensors.append(t)

    if optimizer is not None:
        for group in optimizer.param_groups:
            for param in group["params"]:
                add(param)
                for value in optimizer.state.get(param, {}).values():
                    add(value)
    for module in modules:
        for buffer in module.buffers():
            if buffer.is_floating_point():
                add(buffer)
    return tensors


class NonFiniteGuard:
    """Per-epoch device flags of non-finite losses and gradients, and what ``policy`` does.

    Under ``stop`` a step costs four or five small kernels: each task's loss and the step's
    gradient norm (one fused ``_foreach_norm``) are added to running sums, which stay finite
    exactly as long as every step was (NaN and infinity propagate through sums). Under ``skip``
    each step also gets its own flag, which decides the step: on the device by masking
    (``StepSnapshot``), or, on the CPU, where reading a tensor waits for nothing, on the host.

    Args:
        policy: ``"stop"`` or ``"skip"`` (see the module docstring).
        tasks: the task names, in the order of the loss vector.
        device: where the flags live (the training device).
        check_gradients: also flag non-finite gradients (off under fp16 loss scaling).
        all_reduce: sums a tensor over processes (``Runtime.all_sum``), so every process decides
            alike; the identity on one process.
        optimizer_step: steps an optimizer (``Runtime.optimizer_step``; default ``.step()``).
    """

    def __init__(
        self,
        policy: str,
        tasks: Sequence[str],
        device: torch.device,
        *,
        check_gradients: bool = True,
        all_reduce: Callable[[Tensor], Tensor] | None = None,
        optimizer_step: Callable[[torch.optim.Optimizer], None] | None = None,
    ) -> None:
        if policy not in NONFINITE_POLICIES:
            raise PolytaskError(
                f"train.nonfinite must be one of {', '.join(NONFINITE_POLICIES)}, found {policy!r}"
            )
        self.policy, self.tasks, self.device = policy, list(tasks), device
        self.check_gradients = check_gradients
        self.all_reduce = all_reduce
        self._optimizer_step = optimizer_step or (lambda optimizer: optimizer.step())
        #: decide a ``skip`` on the host (reading a CPU tensor is no device sync)
        self.host_decides = device.type == "cpu" and all_reduce is None
        self.step = 0  # the last step observed (global, from 1)
        self.clean_until = 0  # the last step known to be finite
        self.start_epoch()

    @classmethod
    def for_runtime(
        cls, policy: str, tasks: Sequence[TaskSpec], runtime: Runtime
    ) -> NonFiniteGuard:
        """The guard of a Trainer on ``runtime``: gradients are checked unless fp16 loss
        scaling is on (the ``GradScaler`` skips those steps itself), and the flags are summed
        over processes under data parallelism."""
        return cls(
            policy,
            [t.name for t in tasks],
            runtime.device,
            check_gradients=not runtime.precision.scales_loss,
            all_reduce=runtime.all_sum if runtime.world_size > 1 else None,
            optimizer_step=runtime.optimizer_step,
        )

    @property
    def skips(self) -> bool:
        return self.policy == "skip"

    def start_epoch(self) -> None:
        k = len(self.tasks)
        #: per task the sum of its step losses, then the sum of the steps' gradient norms
        self.sums = torch.zeros(k + 1, device=self.device)
        #: under ``skip``: per task the steps with a non-finite loss, then the skipped steps
        self.flagged = torch.zeros(k + 1, dtype=torch.int64, device=self.device)
        self.steps = 0

    def snapshot(
        self, optimizer: torch.optim.Optimizer, modules: Iterable[nn.Module]
    ) -> StepSnapshot | None:
        """Under ``skip``, a copy of the state the coming step may change (else ``None``); when
        the host decides, only the modules' buffers (the optimizer step is simply not taken)."""
        if not self.skips:
            return None
        return StepSnapshot(None if self.host_decides else optimizer, modules, self.device)

    def optimizer_step(
        self,
        optimizer: torch.optim.Optimizer,
        snapshot: StepSnapshot | None,
        losses: Tensor,
        params: Sequence[Tensor],
        step: int,
    ) -> None:
        """Step ``optimizer`` (optimizer step ``step``, counted from 1), flagging its ``losses``
        and the gradients of ``params``; under ``skip`` a step that is not finite changes
        nothing (not taken when the host decides; else undone from the ``snapshot``)."""
        grads = [p.grad for p in params if p.grad is not None]
        finite = self.observe(losses, grads, step=step)
        if finite is not None and self.host_decides:
            if bool(finite):  # the buffers the forward changed stay
                snapshot = None
            else:
                if snapshot is not None:
                    snapshot.restore_unless(finite)
                return
        self._optimizer_step(optimizer)
        if finite is not None and snapshot is not None:
            snapshot.restore_unless(finite)

    def observe(self, losses: Tensor, grads: Sequence[Tensor], *, step: int) -> Tensor | None:
        """Add one step to the sums; under ``skip``, the 0-dim bool tensor that is true when the
        step is finite (the same on every process), else ``None``."""
        if self.steps == 0:  # the steps before this epoch's first were checked
            self.clean_until = step - 1
        self.step, self.steps = step, self.steps + 1
        losses = losses.detach().float()
        norm = losses.new_zeros(())
        if self.check_gradients and grads:
            norms = list(torch._foreach_norm(list(grads)))  # one fused kernel (per dtype)
            if len({n.dtype for n in norms}) > 1:
                norms = [n.float() for n in norms]
            norm = torch.stack(norms).sum().float()
        values = torch.cat([losses, norm[None]])
        self.sums += values
        if not self.skips:
            return None
        bad = ~torch.isfinite(values)
        bad[-1] = bad.any()  # a skipped step
        if self.all_reduce is not None:
            bad = self.all_reduce(bad.to(torch.int64)) > 0
        self.flagged += bad
        return ~bad[-1]

    def peek(self) -> list[float]:
        """The running sums (a host sync: call it where the loop synchronises anyway)."""
        sums = self.sums if self.all_reduce is None else self.all_reduce(self.sums)
        return sums.tolist()

    def check(self, epoch: int, sums: Sequence[float] | None = None) -> None:
        """Under ``stop``, raise ``NonFiniteError`` if a step of this epoch was not finite (a
        host sync, unless the ``sums`` were just read)."""
        if self.policy != "stop":
            return
        sums = self.peek() if sums is None else sums
        if all(math.isfinite(v) for v in sums):
            self.clean_until = self.step
            return
        raise NonFiniteError(f"train.nonfinite: {self._describe(sums, epoch)}; {_HINT}")

    def refresh(self, epoch: int) -> None:
        """``check`` at a point where the loop has just synchronised with the device (the
        progress bar); nothing under data parallelism, where every process must decide
        together (at the end of the epoch)."""
        if self.all_reduce is None:
            self.check(epoch)

    def end_epoch(self, epoch: int) -> dict[str, Any]:
        """Check the epoch (``stop``: any step not finite; ``skip``: every step skipped), start
        the next one, and return what the epoch's record adds: ``skipped_steps`` under
        ``skip``."""
        sums = self.peek()
        self.check(epoch, sums)
        if not self.skips:
            self.start_epoch()
            return {}
        flagged = self.flagged.tolist()
        skipped, steps = int(flagged[-1]), self.steps
        if steps and skipped == steps:
            bad = [float("nan") if n else 0.0 for n in flagged[:-1]] + [sums[-1]]
            raise NonFiniteError(
                f"train.nonfinite: all {skipped} steps of epoch {epoch} were skipped, with a "
                f"{self._describe(bad, epoch)}; lower optimizer.lr, set train.grad_clip or "
                "check the data"
            )
        self.start_epoch()
        return {"skipped_steps": skipped}

    def _describe(self, sums: Sequence[float], epoch: int) -> str:
        """What was not finite, and the steps it happened between."""
        first, last = self.clean_until + 1, self.step
        steps = f"step {last}" if first >= last else f"steps {first}-{last}"
        where = f"at {steps} (epoch {epoch})"
        names = [
            repr(name) for name, v in zip(self.tasks, sums, strict=False) if not math.isfinite(v)
        ]
        if not names:
            return f"non-finite gradient (finite task losses) {where}"
        what = f"task {names[0]}" if len(names) == 1 else f"tasks {', '.join(names)}"
        return f"non-finite loss of {what} {where}"
