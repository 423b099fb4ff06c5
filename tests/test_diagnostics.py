"""Gradient-conflict diagnostics against a brute-force ``torch.autograd.grad`` per task."""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from polytask.balancing import BALANCERS, Balancer
from polytask.balancing.diagnostics import GradientDiagnostics
from polytask.config import parse_config
from polytask.errors import ConfigError
from polytask.models import MultiTaskModel, build_model
from polytask.run.single import train_run
from polytask.tasks import TaskSpec
from processes import free_port

TASKS = [TaskSpec("a", "regression"), TaskSpec("b", "binary"), TaskSpec("c", "regression")]


def _setup(method: str, params: dict[str, Any] | None = None) -> tuple[MultiTaskModel, Balancer]:
    torch.manual_seed(0)
    model = build_model(TASKS, (5,), encoder_params={"hidden": [7, 6]}).double()
    balancer = BALANCERS.get(method)(TASKS, **(params or {}))
    balancer.attach(model)  # the layer-wise Gramian hooks, as the Trainer's runtime does
    return model, balancer


def _losses(
    model: MultiTaskModel, seed: int, *, absent: str | None = None
) -> tuple[Tensor, Tensor]:
    """The task losses of a random batch, and the shared features."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(24, 5, generator=generator, dtype=torch.float64)
    y = {
        "a": torch.randn(24, generator=generator, dtype=torch.float64),
        "b": torch.randint(0, 2, (24,), generator=generator).double(),
        "c": torch.randn(24, generator=generator, dtype=torch.float64) + 1,
    }
    if absent is not None:
        y[absent] = torch.full((24,), math.nan, dtype=torch.float64)
    out = model(x)
    losses = [t.compute_loss(out.outputs[t.name], y[t.name])[0] for t in TASKS]
    return torch.stack(losses), out.features


def _per_task(losses: Tensor, shared: Sequence[Tensor]) -> Tensor:
    """The brute force: one ``torch.autograd.grad`` per task, flattened to ``[K, P]``."""
    rows = []
    for loss in losses:
        grads = torch.autograd.grad(loss, list(shared), retain_graph=True, allow_unused=True)
        rows.append(
            torch.cat(
                [
                    (g if g is not None else torch.zeros_like(p)).reshape(-1)
                    for g, p in zip(grads, shared, strict=True)
                ]
            )
        )
    return torch.stack(rows)


def _grad(shared: Sequence[Tensor]) -> Tensor:
    return torch.cat([p.grad.reshape(-1) for p in shared])  # type: ignore[union-attr]


def _expected(jacobian: Tensor, update: Tensor, present: Tensor) -> dict[str, Any]:
    norms = jacobian.norm(dim=1)
    cosine = (jacobian @ jacobian.T) / (norms[:, None] * norms[None, :])
    inner = jacobian @ update
    nan = torch.tensor(math.nan, dtype=torch.float64)
    cosine = torch.where(present[:, None] & present[None, :], cosine, nan)
    return {
        "cosine": cosine.tolist(),
        "norms": torch.where(present, norms, nan).tolist(),
        "update_inner": torch.where(present, inner, nan).tolist(),
    }


def _nan(value: Any) -> Any:
    """``value`` with ``None`` (an absent task) as ``nan``."""
    return (
        [_nan(v) for v in value]
        if isinstance(value, list)
        else value
        if value is not None
        else math.nan
    )


def _assert_close(found: Any, expected: Any) -> None:
    a = torch.tensor(_nan(found), dtype=torch.float64)
    b = torch.tensor(expected, dtype=torch.float64)
    assert torch.equal(a.isnan(), b.isnan()), (found, expected)
    scale = float(b.nan_to_num().abs().max()) or 1.0
    torch.testing.assert_close(a.nan_to_num(), b.nan_to_num(), rtol=0, atol=1e-5 * max(scale, 1))


def _one_step(
    method: str,
    *,
    params: dict[str, Any] | None = None,
    absent: str | None = None,
    micro_batches: int = 1,
    steps: int = 1,
) -> tuple[dict[str, Any], list[dict[str, Any]], list[bool]]:
    """Run ``steps`` observed steps; return the record, the brute-force expectations and
    whether the balancer reported the geometry itself at each step."""
    model, balancer = _setup(method, params)
    shared = model.shared_parameters()
    diagnostics = GradientDiagnostics(balancer, shared, every=1)
    present = torch.tensor([t.name != absent for t in TASKS])
    expected, reported = [], []
    for step in range(steps):
        model.zero_grad(set_to_none=True)
        balancer.zero_grad(set_to_none=True)
        jacobian = torch.zeros(0)
        for micro in range(micro_batches):
            losses, features = _losses(model, 10 * step + micro, absent=absent)
            block = _per_task(losses, shared)
            jacobian = block if micro == 0 else jacobian + block
            observed = diagnostics.at(step, micro_batches)
            assert not isinstance(observed, Balancer)
            reported.append(observed.reported)
            observed.backward(
                losses,
                shared_params=shared if balancer.needs_shared_params else None,
                features=features if balancer.needs_features else None,
                present=present,
                grad_scale=1.0 / micro_batches if micro_batches > 1 else 1.0,
            )
        # the balancer wrote the mean update over micro-batches (grad_scale 1/m each)
        expected.append(_expected(jacobian / micro_batches, _grad(shared), present))
        with torch.no_grad():
            for p in shared:
                p.sub_(0.1 * p.grad)  # type: ignore[operator]
    return diagnostics.end_epoch()["diagnostics"], expected, reported


@pytest.mark.parametrize(
    ("method", "reports"),
    [("uncertainty", False), ("equal", False), ("mgda", True), ("upgrad", True), ("pcgrad", True)],
)
def test_matches_brute_force_per_task_gradients(method: str, reports: bool) -> None:
    record, expected, reported = _one_step(method)
    assert reported == [reports]  # gradient methods hand over what they formed
    assert record["tasks"] == ["a", "b", "c"] and record["steps"] == [1]
    for key in ("cosine", "norms", "update_inner"):
        _assert_close(record[key][0], expected[0][key])
    assert min(record["norms"][0]) > 0 and record["cosine"][0][0][0] == pytest.approx(1.0)


def test_uses_the_layerwise_gramian_when_the_method_forms_it() -> None:
    _, balancer = _setup("upgrad")
    assert balancer.gramian_source.ready  # type: ignore[union-attr]
    record, expected, _ = _one_step("upgrad")
    _assert_close(record["update_inner"][0], expected[0]["update_inner"])


@pytest.mark.parametrize("method", ["uncertainty", "upgrad", "pcgrad"])
def test_an_absent_task_is_null(method: str) -> None:
    record, expected, _ = _one_step(method, absent="b")
    assert record["norms"][0][1] is None and record["update_inner"][0][1] is None
    assert all(record["cosine"][0][1][j] is None for j in range(3))
    assert all(record["cosine"][0][i][1] is None for i in range(3))
    for key in ("cosine", "norms", "update_inner"):
        _assert_close(record[key][0], expected[0][key])


@pytest.mark.parametrize("method", ["uncertainty", "upgrad"])
def test_accumulated_micro_batches_give_the_step_means(method: str) -> None:
    record, expected, reported = _one_step(method, micro_batches=2)
    assert reported == [False, False]  # a micro-batch's Gramian is not the step's
    for key in ("cosine", "norms", "update_inner"):
        _assert_close(record[key][0], expected[0][key])


def test_steps_that_reuse_weights_and_representation_level_methods() -> None:
    record, expected, reported = _one_step("upgrad", params={"update_every": 2}, steps=2)
    assert reported == [True, False]  # the second step reuses the weights: no Gramian formed
    assert record["steps"] == [1, 2]
    for step in range(2):
        for key in ("cosine", "norms", "update_inner"):
            _assert_close(record[key][step], expected[step][key])
    record, expected, reported = _one_step("mgda", params={"level": "features"})
    assert reported == [False]  # its Gramian is of the features' gradients, not the parameters'
    _assert_close(record["update_inner"][0], expected[0]["update_inner"])


def test_off_and_between_observed_steps_it_is_the_balancer_itself() -> None:
    model, balancer = _setup("equal")
    off = GradientDiagnostics(balancer, model.shared_parameters())
    assert off.at(0) is balancer and off.end_epoch() == {}
    every = GradientDiagnostics(balancer, model.shared_parameters(), every=5)
    assert [every.at(s) is balancer for s in range(6)] == [False, True, True, True, True, False]


def _run(tiny_raw: dict[str, Any], **balancing: Any) -> list[dict[str, Any]]:
    raw = copy.deepcopy(tiny_raw)
    raw["balancing"] = {"method": "upgrad", **balancing}
    raw["train"]["epochs"] = 2
    result = train_run(parse_config(raw))
    lines = (Path(result.run_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_a_run_logs_diagnostics_in_metrics_jsonl(tiny_raw: dict[str, Any]) -> None:
    records = _run(tiny_raw, diagnostics={"every": 2})
    steps = [s for r in records for s in r["diagnostics"]["steps"]]
    assert steps == list(range(1, records[-1]["step"] + 1, 2))
    for record in records:
        d = record["diagnostics"]
        k = len(d["tasks"])
        assert d["tasks"] == list(record["train"])
        assert len(d["cosine"]) == len(d["norms"]) == len(d["update_inner"]) == len(d["steps"])
        for cosine in d["cosine"]:
            matrix = torch.tensor(cosine, dtype=torch.float64)
            assert matrix.shape == (k, k)
            torch.testing.assert_close(matrix, matrix.T, equal_nan=True)
            assert bool((matrix.nan_to_num().abs() <= 1).all())
    assert "diagnostics" not in _run(tiny_raw)[0]


def test_bad_every_names_the_field(tiny_raw: dict[str, Any]) -> None:
    tiny_raw["balancing"]["diagnostics"] = {"every": 0}
    with pytest.raises(ConfigError, match=r"balancing\.diagnostics\.every"):
        parse_config(tiny_raw)


# --------------------------------------------------------------------------- data parallelism

DDP_TASKS = [TaskSpec("r", "regression"), TaskSpec("b", "binary")]


def _ddp_step(method: str, rank: int, world: int) -> dict[str, Any]:
    """One Trainer step over a batch of 16 (sharded over ``world`` processes), observed."""
    from polytask.data.batches import BatchLoader, MultiLabelDataset
    from polytask.runtime import DistributedContext, Runtime
    from polytask.train.trainer import Trainer

    torch.manual_seed(0)
    model = build_model(DDP_TASKS, (5,), encoder_params={"hidden": [8]})
    balancer = BALANCERS.get(method)(DDP_TASKS)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 5, generator=g)
    y = {"r": torch.randn(16, generator=g), "b": torch.randint(0, 2, (16,), generator=g).float()}
    y["r"][[0, 1, 2, 9]] = math.nan  # unevenly missing over the shards
    if world == 1:
        runtime = Runtime("cpu")
    else:
        from polytask.balancing.reduce import Reducer

        runtime = Runtime(distributed=DistributedContext(rank, world, reducer=Reducer()))
    loader = BatchLoader(MultiLabelDataset(x, y), 16 // world, rank=rank, world_size=world)
    trainer = Trainer(
        model,
        balancer,
        DDP_TASKS,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        scheduler=None,
        train_batches=loader,
        val_batches=None,
        epochs=1,
        runtime=runtime,
        progress=False,
    )
    trainer.diagnostics.every = 1
    for batch in loader:
        trainer.train_step([batch])
    return trainer.diagnostics.end_epoch()["diagnostics"]


def _ddp_worker(rank: int, port: int, out: str) -> None:
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    results = {method: _ddp_step(method, rank, 2) for method in ("equal", "upgrad")}
    Path(f"{out}.{rank}").write_text(json.dumps(results))
    dist.destroy_process_group()


def test_two_processes_record_the_global_step(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    port = free_port()
    # fork: the workers inherit the imported modules instead of importing torch again
    mp.start_processes(
        _ddp_worker, args=(port, str(tmp_path / "out")), nprocs=2, start_method="fork"
    )
    ranks = [json.loads((tmp_path / f"out.{r}").read_text()) for r in range(2)]
    for method in ("equal", "upgrad"):
        single = _ddp_step(method, 0, 1)
        for found in (ranks[0][method], ranks[1][method]):  # identical on every process
            for key in ("cosine", "norms", "update_inner"):
                _assert_close(found[key], single[key])


def test_a_resumed_run_may_turn_them_on(tiny_raw: dict[str, Any]) -> None:
    import yaml

    from polytask.run.single import resume_run

    tiny_raw["train"]["epochs"] = 1
    run_dir = Path(train_run(parse_config(tiny_raw)).run_dir)
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    config["train"]["epochs"] = 2
    config["balancing"]["diagnostics"] = {"every": 3}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    resume_run(run_dir, progress=False)
    first, second = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    assert "diagnostics" not in first
    assert second["diagnostics"]["steps"][0] > first["step"]
