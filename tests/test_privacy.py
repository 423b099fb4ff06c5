"""Differentially private training (DP-SGD): the clipping bound, the noise scale, the accountant,
missing labels, Poisson sampling of records, reproducibility, the methods refused, BatchNorm,
the CLI on the private tabular recipe, and 2 processes = 1 process."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from typer.testing import CliRunner

from polytask.balancing import BALANCERS, build_balancer
from polytask.cli import app
from polytask.config import PrivacyConfig, parse_config
from polytask.data.batches import MultiLabelDataset
from polytask.data.poisson import PoissonBatches
from polytask.errors import ConfigError
from polytask.models import build_model
from polytask.privacy import (
    PRIVATE_METHODS,
    REFUSED_METHODS,
    PrivacyBudget,
    PrivateStep,
    PrivateTrainer,
    check_model,
    clip_factors,
    private_mode,
)
from polytask.run.single import resume_run, train_run
from polytask.runtime import DistributedContext, Runtime
from polytask.tasks import TaskSpec
from polytask.train.checkpoint import load_checkpoint, save_checkpoint
from processes import free_port

TASKS = [
    TaskSpec("r", "regression"),
    TaskSpec("c", "multiclass", num_classes=3),
    TaskSpec("b", "binary"),
]


def _data(n: int = 24, seed: int = 1) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g) * 3
    y = {
        "r": torch.randn(n, generator=g) * 5,
        "c": torch.randint(0, 3, (n,), generator=g),
        "b": torch.randint(0, 2, (n,), generator=g).float(),
    }
    y["r"][[0, 3]] = float("nan")
    y["c"][[0, 5]] = -1
    y["b"][0] = float("nan")  # record 0 has no label at all
    return x, y


def _step(
    method: str, *, c: float = 0.05, sigma: float = 0.0, expected: float = 8.0, hidden: int = 8
):
    torch.manual_seed(0)
    model = build_model(TASKS, (5,), encoder_params={"hidden": [hidden]})
    balancer = build_balancer(method, TASKS)
    step = PrivateStep(
        model,
        balancer,
        TASKS,
        mode=private_mode(method, balancer),
        max_grad_norm=c,
        noise_multiplier=sigma,
        expected_batch_size=expected,
        runtime=Runtime("cpu"),
    )
    return model, balancer, step


# ---------------------------------------------------------------- methods
def test_every_registered_method_is_supported_or_refused_with_its_reason() -> None:
    names = set(BALANCERS.names())
    assert names == set(PRIVATE_METHODS) | set(REFUSED_METHODS)
    assert not set(PRIVATE_METHODS) & set(REFUSED_METHODS)
    for name in sorted(names):
        balancer = build_balancer(name, TASKS)
        if name in PRIVATE_METHODS:
            if getattr(balancer, "level", "parameters") == "features":  # e.g. graddrop's default
                with pytest.raises(ConfigError, match="level 'features'"):
                    private_mode(name, balancer)
                balancer = build_balancer(name, TASKS, params={"level": "parameters"})
            assert private_mode(name, balancer) == PRIVATE_METHODS[name][0]
        else:
            with pytest.raises(ConfigError) as error:
                private_mode(name, balancer)
            assert f"{name!r} is not private: {REFUSED_METHODS[name]}" in str(error.value)


def test_loss_dependent_settings_are_refused() -> None:
    with pytest.raises(ConfigError, match="log_losses"):
        private_mode("upgrad", build_balancer("upgrad", TASKS, log_losses=True))
    with pytest.raises(ConfigError, match="normalization"):
        private_mode("mgda", build_balancer("mgda", TASKS, params={"normalization": "loss"}))
    with pytest.raises(ConfigError, match="update_every"):
        private_mode("upgrad", build_balancer("upgrad", TASKS, params={"update_every": 2}))


# ---------------------------------------------------------------- the mechanism
@pytest.mark.parametrize("method", ["equal", "uncertainty", "upgrad"])
def test_each_record_is_clipped_and_one_record_moves_the_sum_by_at_most_c(method: str) -> None:
    _, _, step = _step(method, c=0.05)
    x, y = _data()
    weights = torch.ones(len(TASKS))
    per_record, _, _ = step.per_record(x, y, weights)
    norms = torch.linalg.vector_norm(per_record, dim=1)
    assert (norms[1:] > 0.05).all()  # the bound is active: every labelled record is clipped
    clipped = per_record * clip_factors(per_record, 0.05)[:, None]
    assert (torch.linalg.vector_norm(clipped, dim=1) <= 0.05 + 1e-6).all()
    # the sensitivity of the released sum: removing any one record moves it by at most C
    total = clipped.sum(0)
    for i in range(len(x)):
        assert torch.linalg.vector_norm(total - (total - clipped[i])) <= 0.05 + 1e-6


def test_without_clipping_or_noise_the_step_is_the_mean_gradient_over_records() -> None:
    model, _, step = _step("equal", c=1e9, expected=24.0)
    x, y = _data()
    step.backward(x, y)
    private = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    out = model(x).outputs
    per_task_sums = [t.compute_loss(out[t.name], y[t.name]) for t in TASKS]
    (sum(loss * count for loss, count in per_task_sums) / 24.0).backward()
    for p, g in zip(model.parameters(), private, strict=True):
        torch.testing.assert_close(g, p.grad, atol=1e-5, rtol=1e-4)


def test_a_missing_label_is_a_zero_row_of_the_record_jacobian() -> None:
    _, _, step = _step("upgrad", c=1e9)
    x, y = _data()
    per_record, losses, labelled = step.per_record(x, y, torch.ones(3))
    width = sum(p.numel() for p in step.shared.values())
    rows = per_record[:, : 3 * width].view(len(x), 3, width)
    assert torch.equal(labelled[0], torch.zeros(3, dtype=torch.bool))
    assert torch.count_nonzero(per_record[0]) == 0  # no label at all: nothing to release
    assert torch.count_nonzero(rows[3, 0]) == 0 and torch.count_nonzero(rows[3, 1]) > 0
    assert torch.count_nonzero(rows[5, 1]) == 0 and torch.count_nonzero(rows[5, 2]) > 0
    assert losses[3, 0] == 0 and not labelled[3, 0] and labelled[3, 1]


@pytest.mark.parametrize("method", ["equal", "upgrad"])
def test_the_noise_std_is_sigma_c_over_the_expected_batch(method: str) -> None:
    # no record is labelled: every gradient is 0, so .grad is the noise alone
    model, _, step = _step(method, c=0.5, sigma=2.0, expected=4.0, hidden=64)
    x, y = _data(8)
    y = {k: torch.full_like(v, -1 if k == "c" else float("nan")) for k, v in y.items()}
    heads = [p for n, p in model.named_parameters() if n in step.heads]
    draws = []
    for _ in range(60):
        model.zero_grad(set_to_none=True)
        step.backward(x, y)
        draws.append(torch.cat([p.grad.flatten() for p in heads]))
    noise = torch.stack(draws)
    assert noise.numel() > 10_000
    assert abs(float(noise.std()) - 2.0 * 0.5 / 4.0) < 0.01 * 0.25 * 3
    assert abs(float(noise.mean())) < 0.01


# ---------------------------------------------------------------- accountant and sampling
@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_the_reported_epsilon_is_opacus_for_the_same_sigma_q_and_steps(accountant: str) -> None:
    from opacus.accountants import PRVAccountant, RDPAccountant

    budget = PrivacyBudget(3.0, 1e-5, 0.05, 1.1, accountant)
    opacus = RDPAccountant() if accountant == "rdp" else PRVAccountant()
    for _ in range(120):
        opacus.step(noise_multiplier=1.1, sample_rate=0.05)
    assert budget.epsilon(120) == pytest.approx(opacus.get_epsilon(delta=1e-5), rel=1e-9)
    assert budget.epsilon(0) == 0.0


def test_the_planned_noise_spends_the_target_and_a_fixed_noise_stops_before_it() -> None:
    planned = PrivacyBudget.plan(target_epsilon=3.0, delta=1e-5, sample_rate=0.1, planned_steps=100)
    assert 2.9 <= planned.epsilon(100) <= 3.0
    assert planned.affordable_epochs(10, 10) == 10
    fixed = PrivacyBudget(3.0, 1e-5, 0.1, 1.5)
    epochs = fixed.affordable_epochs(10, 10)
    assert 0 < epochs < 10
    assert fixed.epsilon(epochs * 10) <= 3.0 < fixed.epsilon((epochs + 1) * 10)


def test_the_sampling_rate_counts_records_not_labels_and_shards_cover_the_batch() -> None:
    x, y = _data(200)
    y = {k: v.clone() for k, v in y.items()}
    y["r"][:150] = float("nan")  # most records lack a label: still records
    data = MultiLabelDataset(x, y)
    batches = PoissonBatches(data, 20, seed=3)
    assert batches.sample_rate == 20 / 200 and len(batches) == 10
    sizes = []
    for epoch in range(20):
        batches.set_epoch(epoch)
        sizes += [len(inputs) for inputs, _ in batches]
    assert abs(sum(sizes) / len(sizes) - 20) < 1.5  # 200 batches: the mean is within 1.1 SE
    batches.set_epoch(1)
    whole = [b[0] for b in batches]
    shards = []
    for rank in range(2):
        part = PoissonBatches(data, 20, seed=3, rank=rank, world_size=2)
        part.set_epoch(1)
        assert part.sample_rate == 0.1  # the global rate
        shards.append([b[0] for b in part])
    for i, full in enumerate(whole):
        union = torch.cat([shards[0][i], shards[1][i]])
        assert sorted(map(tuple, union.tolist())) == sorted(map(tuple, full.tolist()))


# ---------------------------------------------------------------- runs
def _private_raw(tiny_raw: dict[str, Any], method: str = "upgrad") -> dict[str, Any]:
    raw = dict(tiny_raw)
    raw["balancing"] = {"method": method}
    raw["train"] = {
        **tiny_raw["train"],
        "epochs": 2,
        "privacy": {"target_epsilon": 3.0, "max_grad_norm": 1.0},
    }
    return raw


def test_a_private_run_is_reproducible_from_its_seed(tiny_raw: dict[str, Any]) -> None:
    raw = _private_raw(tiny_raw)
    first = train_run(parse_config(raw))
    again = train_run(parse_config(raw))
    assert first.test == again.test
    assert first.privacy == again.privacy and 0 < first.privacy["epsilon"] <= 3.0
    records = [
        json.loads(line) for line in (first.run_dir / "metrics.jsonl").read_text().splitlines()
    ]
    spent = [r["privacy"]["epsilon"] for r in records]
    assert spent == sorted(spent) and spent[-1] == first.privacy["epsilon"]
    # resumed with more epochs: σ stays the one the run started with, so no epoch fits
    config_path = first.run_dir / "config.yaml"
    edited = yaml.safe_load(config_path.read_text())
    edited["train"]["epochs"] = 4
    config_path.write_text(yaml.safe_dump(edited))
    resumed = resume_run(first.run_dir)
    assert resumed.privacy == first.privacy and resumed.fit.epochs_run == 2


@pytest.mark.parametrize("method", ["dwa", "famo", "gls", "gradnorm"])
def test_a_leaking_method_is_refused_before_training(tiny_raw: dict[str, Any], method: str) -> None:
    with pytest.raises(ConfigError, match=f"'{method}' is not private"):
        train_run(parse_config(_private_raw(tiny_raw, method)))


def test_gradient_diagnostics_are_refused_with_privacy(tiny_raw: dict[str, Any]) -> None:
    """The diagnostics read the task gradients before clipping and noise: they would leak."""
    raw = _private_raw(tiny_raw, "upgrad")
    raw.setdefault("balancing", {})["diagnostics"] = {"every": 1}
    with pytest.raises(ConfigError, match=r"balancing\.diagnostics must be off"):
        train_run(parse_config(raw))


def test_batchnorm_is_refused_with_a_one_line_error_naming_groupnorm() -> None:
    model = build_model(TASKS, (5,), encoder_params={"hidden": [8], "batch_norm": True})
    with pytest.raises(ConfigError, match="GroupNorm") as error:
        check_model(model)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("method", ["upgrad", "uncertainty"])
def test_the_private_tabular_recipe_runs_from_the_cli(tmp_path: Path, method: str) -> None:
    result = CliRunner().invoke(
        app,
        [
            "train",
            "private-tabular",
            "--no-progress",
            f"output_dir={tmp_path}",
            f"balancing.method={method}",
            "train.epochs=3",
        ],
    )
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "private-students"
    privacy = json.loads((run_dir / "results.json").read_text())["privacy"]
    assert privacy["target_epsilon"] == 3.0 and 2.5 < privacy["epsilon"] <= 3.0
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["privacy"]["steps"] for line in lines] == [9, 18, 27]
    assert "privacy: ε = " in result.output


# ---------------------------------------------------------------- data parallelism
WORLD = 2


def _private_steps(ctx: DistributedContext | None) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = build_model(TASKS, (5,), encoder_params={"hidden": [8]})
    balancer = build_balancer("upgrad", TASKS)
    rank, world = (ctx.rank, ctx.world_size) if ctx else (0, 1)
    x, y = _data(64)
    batches = PoissonBatches(MultiLabelDataset(x, y), 16, seed=5, rank=rank, world_size=world)
    trainer = PrivateTrainer(
        model,
        balancer,
        TASKS,
        method="upgrad",
        privacy=PrivacyConfig(target_epsilon=50.0, noise_multiplier=0.8),
        optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
        scheduler=None,
        train_batches=batches,
        val_batches=None,
        epochs=1,
        runtime=Runtime("cpu") if ctx is None else Runtime(distributed=ctx),
        progress=False,
    )
    for batch in batches:
        trainer.train_step([batch])
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    report = trainer.privacy_report()
    state["epsilon"] = torch.tensor(report["epsilon"], dtype=torch.float64)
    state["sample_rate"] = torch.tensor(report["sample_rate"], dtype=torch.float64)
    return state


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    from polytask.balancing.reduce import Reducer

    torch.set_num_threads(1)
    ctx = DistributedContext(rank=rank, world_size=WORLD, reducer=Reducer())
    state = _private_steps(ctx)
    if rank == 0:
        save_checkpoint(Path(out), state)
    dist.destroy_process_group()


def test_two_processes_add_the_noise_once_and_equal_one_process(tmp_path: Path) -> None:
    port = free_port()
    out = tmp_path / "ddp.safetensors"
    single = _private_steps(None)  # first: the forked children inherit its warmed-up state
    # fork: the children inherit the imported modules (spawn would import torch and polytask again)
    mp.start_processes(_worker, args=(port, str(out)), nprocs=WORLD, start_method="fork")
    distributed = load_checkpoint(out)
    assert float(single["sample_rate"]) == 16 / 64  # the global rate, on every process
    assert set(single) == set(distributed)
    for key, value in single.items():
        torch.testing.assert_close(distributed[key], value, atol=1e-5, rtol=1e-5, msg=key)
