"""Non-finite losses and gradients (``train.nonfinite``) never train on silently, and NaN is
never the best epoch."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from cli_checks import one_error_line as _one_error_line
from polytask.balancing import build_balancer
from polytask.cli import app
from polytask.data.batches import BatchLoader, MultiLabelDataset
from polytask.models import build_model
from polytask.runtime import Runtime
from polytask.tasks import TaskSpec
from polytask.train.early_stopping import EarlyStopping
from polytask.train.nonfinite import NonFiniteError
from polytask.train.trainer import Trainer

TASKS = [TaskSpec("a", "regression"), TaskSpec("b", "binary")]


def _trainer(
    nonfinite: str = "stop", *, epochs: int = 1, progress: bool = False, masked: bool = False
) -> Trainer:
    """4 steps per epoch; ``masked``: undo skipped steps on the device, as on a GPU (on the CPU
    the host decides)."""
    n, batch = 64, 16
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    y = {"a": x[:, 0].clone(), "b": (x[:, 1] > 0).float()}
    model = build_model(TASKS, (4,), encoder_params={"hidden": [8]})
    balancer = build_balancer("equal", TASKS)
    trainer = Trainer(
        model,
        balancer,
        TASKS,
        optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2),
        scheduler=None,
        train_batches=BatchLoader(MultiLabelDataset(x, y), batch, shuffle=True, seed=0),
        val_batches=None,
        epochs=epochs,
        runtime=Runtime(torch.device("cpu")),
        progress=progress,
        nonfinite=nonfinite,
    )
    trainer.guard.host_decides = not masked
    return trainer


def _nan_head(trainer: Trainer, task: str, calls: set[int]) -> None:
    """Make ``task``'s head output NaN on the forward calls numbered ``calls`` (from 1)."""
    count = [0]

    def hook(module: Any, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        count[0] += 1
        return output * math.nan if count[0] in calls else output

    trainer.model.heads[task].register_forward_hook(hook)


def _nan_gradient(trainer: Trainer, calls: set[int]) -> None:
    """Make the first encoder parameter's gradient NaN on the backward calls ``calls``."""
    count = [0]
    param = next(iter(trainer.model.encoder.parameters()))

    def hook(grad: torch.Tensor) -> torch.Tensor:
        count[0] += 1
        return grad * math.nan if count[0] in calls else grad

    param.register_hook(hook)


def _state(trainer: Trainer) -> dict[str, Any]:
    return copy.deepcopy(
        {"model": trainer.model.state_dict(), "optimizer": trainer.optimizer.state_dict()}
    )


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def test_stop_ends_the_run_at_the_epoch_end_naming_the_task_and_steps() -> None:
    trainer = _trainer("stop", epochs=3)
    _nan_head(trainer, "b", {8})  # the last step of epoch 2
    with pytest.raises(NonFiniteError, match=r"loss of task 'b' at steps 5-8 \(epoch 2\)"):
        trainer.fit()
    assert trainer.epoch == 2


def test_stop_checks_where_the_progress_bar_synchronises() -> None:
    trainer = _trainer("stop", progress=True)  # 4 steps: the bar refreshes after each
    _nan_head(trainer, "b", {3})
    with pytest.raises(NonFiniteError, match=r"loss of task 'b' at step 3 \(epoch 1\)"):
        trainer.fit()


def test_stop_names_a_gradient_that_alone_is_not_finite() -> None:
    trainer = _trainer("stop")
    _nan_gradient(trainer, {4})
    with pytest.raises(
        NonFiniteError, match=r"non-finite gradient \(finite task losses\) at steps"
    ):
        trainer.fit()


@pytest.mark.parametrize("masked", [False, True], ids=["host", "masked"])
@pytest.mark.parametrize("poison", ["loss", "gradient"])
def test_skip_leaves_parameters_and_optimizer_state_unchanged(poison: str, masked: bool) -> None:
    trainer = _trainer("skip", masked=masked)
    if poison == "loss":
        _nan_head(trainer, "a", {3})
    else:
        _nan_gradient(trainer, {3})
    batches = list(trainer.train_batches)
    trainer.train_step([batches[0]])
    trainer.train_step([batches[1]])
    before = _state(trainer)
    trainer.train_step([batches[2]])  # not finite: undone
    assert _equal(_state(trainer), before)
    trainer.train_step([batches[3]])  # finite again: applied
    assert not _equal(_state(trainer), before)
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert trainer.guard.end_epoch(1) == {"skipped_steps": 1}


@pytest.mark.parametrize("masked", [False, True], ids=["host", "masked"])
def test_a_skip_on_the_first_step_leaves_the_optimizer_as_new(masked: bool) -> None:
    trainer = _trainer("skip", masked=masked)
    _nan_head(trainer, "a", {1})
    weights = copy.deepcopy(trainer.model.state_dict())
    batch = next(iter(trainer.train_batches))
    trainer.train_step([batch])
    assert _equal(trainer.model.state_dict(), weights)
    for state in trainer.optimizer.state.values():  # as if it had never stepped
        assert all(not torch.is_tensor(v) or not v.any() for v in state.values())


@pytest.mark.parametrize("masked", [False, True], ids=["host", "masked"])
def test_skip_counts_skipped_steps_per_epoch_in_the_log(tmp_path: Path, masked: bool) -> None:
    trainer = _trainer("skip", epochs=2, masked=masked)
    trainer.files = type(trainer.files)(tmp_path, writes=True)
    _nan_head(trainer, "b", {2, 3, 7})  # 4 steps per epoch: two in epoch 1, one in epoch 2
    result = trainer.fit()
    assert [r["skipped_steps"] for r in result.history] == [2, 1]
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open()]
    assert [r["skipped_steps"] for r in logged] == [2, 1]


def test_skip_stops_when_every_step_of_an_epoch_is_skipped() -> None:
    trainer = _trainer("skip", epochs=2)
    _nan_head(trainer, "a", {5, 6, 7, 8})  # all of epoch 2
    with pytest.raises(NonFiniteError, match=r"all 4 steps of epoch 2 were skipped"):
        trainer.fit()


def test_nan_is_never_an_improvement() -> None:
    stop = EarlyStopping()
    assert stop.update(math.nan, 1) is False  # was True: NaN became the best epoch
    assert stop.best_epoch == 0 and math.isnan(stop.best)
    assert stop.update(0.5, 2) is True
    assert stop.update(math.nan, 3) is False
    assert stop.update(math.inf, 4) is False
    assert (stop.best, stop.best_epoch, stop.bad_epochs) == (0.5, 2, 2)


def test_a_diverging_run_exits_1_with_one_line(tiny_yaml: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["train", str(tiny_yaml), "optimizer.lr=1e30"])
    out = _one_error_line(result)  # was exit 0 with NaN metrics
    assert "train.nonfinite: non-finite loss of tasks 't1', 't2' at steps 1-" in out
    assert "(epoch 1)" in out
    assert "train.nonfinite: skip" in out
