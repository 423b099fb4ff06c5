"""``train.cuda_graph``: what can be checked without a GPU.

The capture itself needs CUDA; ``benchmarks/cuda_graph.py`` checks on a GPU that a graphed run
equals the same step run eagerly bit for bit (``benchmarks/results/cuda_graph.md``). Here: the
requirements are refused in one line before anything is written, the methods that declare
``captures_in_cuda_graph`` really do device work only (on the ``meta`` device any host read
raises), and the optimizer state a graphed run checkpoints is the plain one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from typer.testing import CliRunner

from polytask.balancing import BALANCERS, build_balancer
from polytask.cli import app
from polytask.errors import ConfigError
from polytask.train.cuda_graph import GraphedStep, check_graphable

CAPTURED = [e.name for e in BALANCERS if getattr(e.builder, "captures_in_cuda_graph", False)]


def _meta_step(name: str) -> None:
    """One balanced backward with everything on the ``meta`` device (no values exist there:
    any ``.item()``, ``.cpu()`` or ``bool(tensor)`` raises)."""
    balancer = build_balancer(name, ["a", "b", "c"]).to("meta")
    param = torch.nn.Parameter(torch.ones(4, device="meta"))
    losses = torch.stack([(param * (i + 1)).sum() for i in range(3)])
    present = torch.ones(3, dtype=torch.bool, device="meta")
    balancer.backward(losses, shared_params=[param], present=present)


def test_the_captured_methods_are_the_loss_weightings_expected() -> None:
    assert CAPTURED == ["dwa", "equal", "gls", "imtl_l", "uncertainty"]


@pytest.mark.parametrize("name", CAPTURED)
def test_a_captured_method_does_device_work_only(name: str) -> None:
    _meta_step(name)


@pytest.mark.parametrize("name", ["mgda", "upgrad", "cagrad", "pcgrad", "nash_mtl"])
def test_the_meta_check_catches_host_work(name: str) -> None:
    assert not BALANCERS.get(name).captures_in_cuda_graph
    with pytest.raises(RuntimeError, match="meta"):
        _meta_step(name)


def _requirements(**changes: Any) -> dict[str, Any]:
    params = [torch.nn.Parameter(torch.zeros(2))]
    ok: dict[str, Any] = {
        "device": torch.device("cuda"),
        "world_size": 1,
        "accumulate_steps": 1,
        "precision": "fp32",
        "compiled": False,
        "nonfinite": "stop",
        "diagnostics": False,
        "balancer": build_balancer("equal", ["a", "b"]),
        "optimizer": torch.optim.AdamW(params),
    }
    return {**ok, **changes}


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"device": torch.device("cpu")}, "needs a CUDA device"),
        ({"world_size": 2}, "one process"),
        ({"accumulate_steps": 4}, "accumulate_steps: 1"),
        ({"precision": "fp16"}, "fp32 or bf16"),
        ({"compiled": True}, "train.compile"),
        ({"nonfinite": "skip"}, "nonfinite: stop"),
        ({"diagnostics": True}, "diagnostics"),
        ({"balancer": build_balancer("upgrad", ["a", "b"])}, "not 'upgrad'"),
        (
            {"optimizer": torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)},
            "adamw, not SGD",
        ),
    ],
)
def test_each_requirement_is_refused_in_one_line(changes: dict[str, Any], reason: str) -> None:
    check_graphable(**_requirements())  # the reference passes
    with pytest.raises(ConfigError) as caught:
        check_graphable(**_requirements(**changes))
    message = str(caught.value)
    assert message.startswith("train.cuda_graph ") and reason in message and "\n" not in message


def test_the_command_refuses_it_on_the_cpu_before_writing(
    tmp_path: Path, tiny_raw: dict[str, Any]
) -> None:
    tiny_raw["train"] = {**tiny_raw.get("train", {}), "device": "cpu", "cuda_graph": True}
    config = tmp_path / "graph.yaml"
    config.write_text(yaml.safe_dump(tiny_raw))
    result = CliRunner().invoke(app, ["train", str(config)])
    assert result.exit_code == 1
    assert "error: train.cuda_graph needs a CUDA device (the device is cpu)" in result.output
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_checkpointed_optimizer_state_is_the_plain_one() -> None:
    """The graph switches AdamW to ``capturable`` with device (here: CPU) learning-rate
    tensors; ``plain_state`` gives floats and the original flag back, and a schedule that
    writes a float is copied into the tensor the graph reads."""
    param = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([param], lr=0.01)
    param.grad = torch.full((3,), 0.5)
    optimizer.step()  # state exists, with its step count on the host
    step = GraphedStep(lambda x, y: (), optimizer, [param])
    step._prepare_optimizer()
    group = optimizer.param_groups[0]
    lr = group["lr"]
    assert isinstance(lr, torch.Tensor) and group["capturable"] is True
    state = step.plain_state(optimizer.state_dict())
    assert state["param_groups"][0]["lr"] == pytest.approx(0.01)
    assert state["param_groups"][0]["capturable"] is False
    assert isinstance(optimizer.state_dict()["param_groups"][0]["lr"], torch.Tensor)
    group["lr"] = 0.005  # what an older PyTorch's scheduler does
    step.sync_learning_rates()
    assert group["lr"] is lr and float(lr) == pytest.approx(0.005)
    fresh = torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))], lr=0.01)
    fresh.load_state_dict(state)  # a plain eager optimizer takes it
    assert fresh.param_groups[0]["lr"] == pytest.approx(0.01)
