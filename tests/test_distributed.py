"""Data parallelism: one step on 2 gloo processes with batch B each must equal one step on one
process with batch 2B, for every registered balancing method (missing labels included)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from polytask.balancing import BALANCERS, build_balancer
from polytask.data.batches import BatchLoader, MultiLabelDataset
from polytask.models import build_model
from polytask.runtime import DistributedContext, Runtime
from polytask.tasks import TaskSpec
from polytask.train.checkpoint import load_checkpoint, save_checkpoint
from polytask.train.trainer import Trainer
from processes import free_port as _free_port

TASKS = [
    TaskSpec("r", "regression"),
    TaskSpec("c", "multiclass", num_classes=3),
    TaskSpec("b", "binary"),
]
BATCH = 8  # per process
WORLD = 2


def _data() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH * WORLD, 5, generator=g)
    y = {
        "r": torch.randn(BATCH * WORLD, generator=g),
        "c": torch.randint(0, 3, (BATCH * WORLD,), generator=g),
        "b": torch.randint(0, 2, (BATCH * WORLD,), generator=g).float(),
    }
    # missing labels, unevenly spread over the two shards: the global count must be used
    y["r"][[0, 1, 2, 3, 4, 9]] = float("nan")
    y["c"][[8, 10]] = -1
    return x, y


def _methods() -> list[str]:
    out = []
    for name in BALANCERS.names():
        params = BALANCERS.parameters(name)
        level = params.get("level")
        if level is not None and level.default == "features":
            continue  # representation-level methods: not supported under DDP
        out.append(name)
    # DB-MTL's log transform around a loss weighting and two gradient methods; GradDrop at the
    # parameter level (its default, the representation level, is refused under DDP)
    return [*out, "log:equal", "log:upgrad", "log:mgda", *PARAMETER_LEVEL]


#: representation-level methods run at ``level: parameters``, which DDP supports
PARAMETER_LEVEL = ["graddrop@parameters"]


def _balancer(method: str):
    if method in PARAMETER_LEVEL:
        name, level = method.split("@")
        return build_balancer(name, TASKS, params={"level": level})
    name = method.removeprefix("log:")
    return build_balancer(name, TASKS, log_losses=name != method)


def _one_step(method: str, ctx: DistributedContext | None) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = build_model(TASKS, (5,), encoder_params={"hidden": [16, 16]})
    balancer = _balancer(method)
    params = [*model.parameters(), *balancer.parameters()]
    optimizer = torch.optim.SGD(params, lr=1.0)
    x, y = _data()
    rank, world = (ctx.rank, ctx.world_size) if ctx else (0, 1)
    # one process takes the whole batch of 2B; each of the 2 processes its share B
    loader = BatchLoader(
        MultiLabelDataset(x, y), BATCH * WORLD // world, rank=rank, world_size=world
    )
    trainer = Trainer(
        model,
        balancer,
        TASKS,
        optimizer=optimizer,
        scheduler=None,
        train_batches=loader,
        val_batches=None,
        epochs=1,
        runtime=Runtime("cpu") if ctx is None else Runtime(distributed=ctx),
        progress=False,
    )
    for _ in range(2):  # two steps: stateful methods use their state on the second
        for xb, yb in loader:
            trainer.train_step([(xb, yb)])
    state = {f"model.{k}": v.detach().clone() for k, v in model.state_dict().items()}
    state.update({f"balancer.{k}": v.detach().clone() for k, v in balancer.state_dict().items()})
    return state


def _worker(rank: int, port: int, out: str, methods: list[str]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    from polytask.balancing.reduce import Reducer

    ctx = DistributedContext(rank=rank, world_size=WORLD, reducer=Reducer())
    results = {}
    for method in methods:
        results[method] = _one_step(method, ctx)
    if rank == 0:
        save_checkpoint(Path(out), results)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("ddp") / "steps.safetensors"
    mp.spawn(_worker, args=(_free_port(), str(out), _methods()), nprocs=WORLD, join=True)
    return load_checkpoint(out)


@pytest.mark.parametrize("method", _methods())
def test_two_processes_equal_one_process_with_the_whole_batch(method: str, two_process_results):
    single = _one_step(method, None)
    distributed = two_process_results[method]
    assert set(single) == set(distributed)
    for key, value in single.items():
        torch.testing.assert_close(distributed[key], value, atol=1e-5, rtol=1e-5, msg=key)


def test_sharded_batches_cover_the_single_process_batch() -> None:
    x, y = _data()
    data = MultiLabelDataset(torch.arange(len(x)).float()[:, None], y)
    single = [b[0].flatten().tolist() for b in BatchLoader(data, 2 * 3, shuffle=True, seed=4)]
    shards = [
        [
            b[0].flatten().tolist()
            for b in BatchLoader(data, 3, shuffle=True, seed=4, rank=r, world_size=2)
        ]
        for r in range(2)
    ]
    for i, batch in enumerate(single):
        assert shards[0][i] + shards[1][i] == batch


def test_cli_launches_two_gloo_processes(tiny_yaml: Path, tmp_path: Path) -> None:
    """`polytask train --nproc-per-node 2` runs torchrun + DDP on CPU and ends with the same
    files as a one-process run; rank 0 alone writes them."""
    from typer.testing import CliRunner

    from polytask.cli import app
    from polytask.train.runlog import read_metrics

    result = CliRunner().invoke(
        app,
        ["train", str(tiny_yaml), "--no-progress", "--nproc-per-node", "2", "train.epochs=2"],
    )
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "runs" / "tiny"
    assert [r["epoch"] for r in read_metrics(run_dir / "metrics.jsonl")] == [1, 2]
    assert (run_dir / "checkpoints" / "best.safetensors").is_file()
    assert (run_dir / "results.json").is_file()
    assert not (tmp_path / "runs" / "tiny-2").exists()  # one folder, chosen by rank 0
