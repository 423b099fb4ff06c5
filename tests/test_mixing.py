"""Several datasets, one model: samplers, the mixer, epochs, one bundle of several tables,
resume, DDP shares, config, end to end."""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
from scipy.stats import chisquare

from polytask.config import parse_config
from polytask.data.batches import MultiLabelDataset
from polytask.data.bundle import build_bundle
from polytask.data.mixing import (
    MultiTaskMixer,
    TaskDataset,
    epoch_steps,
    evaluation_batches,
    parse_epoch,
    train_parts,
)
from polytask.data.samplers import SAMPLERS, AnnealedSampler, build_sampler
from polytask.data.table import MultiLabelTable
from polytask.errors import ConfigError, DataError
from polytask.evaluate import evaluate
from polytask.models import build_model
from polytask.run import evaluate_run, resume_run, train_run, train_with_baselines
from polytask.tasks import TaskSpec
from processes import free_port, run_processes

SIZES = [400, 40, 4]
TASKS = [
    TaskSpec("a", "regression"),
    TaskSpec("b", "multiclass", num_classes=3),
    TaskSpec("c", "multilabel", num_classes=2),
]


def _datasets(sizes: list[int] = SIZES) -> list[TaskDataset]:
    """Dataset d feeds task ``"abc"[d]``; input column 0 is the dataset, column 1 the row."""
    out = []
    for d, n in enumerate(sizes):
        rows = torch.arange(n, dtype=torch.float32)
        x = torch.stack([torch.full((n,), float(d)), rows], dim=1)
        task = TASKS[d]
        if task.kind == "regression":
            y = rows.clone()
            y[::5] = float("nan")  # a few missing labels inside the dataset
        elif task.kind == "multiclass":
            y = torch.arange(n) % 3
        else:
            y = torch.ones(n, 2)
        out.append(TaskDataset(f"ds{d}", MultiLabelDataset(x, {task.name: y}), (task.name,)))
    return out


def _mixer(**kwargs: Any) -> MultiTaskMixer:
    options: dict[str, Any] = {"batch_size": 4, "epoch": "steps:50", "seed": 3}
    options.update(kwargs)
    datasets = options.pop("datasets", None) or _datasets()
    return MultiTaskMixer(datasets, TASKS, **options)


def _dataset_of_each_sample(mixer: MultiTaskMixer, epoch: int = 1) -> np.ndarray:
    mixer.set_epoch(epoch)
    return torch.cat([x[:, 0] for x, _ in mixer]).long().numpy()


# ---------------------------------------------------------------------------------- formulas
def test_sampler_probabilities_follow_their_formulas() -> None:
    n = np.array(SIZES, dtype=float)
    assert np.allclose(build_sampler("proportional").probabilities(SIZES, 1, 5), n / n.sum())
    assert np.allclose(build_sampler("uniform").probabilities(SIZES, 1, 5), 1 / 3)
    assert np.allclose(build_sampler("round_robin").probabilities(SIZES, 1, 5), 1 / 3)
    t = build_sampler("temperature", {"temperature": 3.0}).probabilities(SIZES, 1, 5)
    assert np.allclose(t, n ** (1 / 3) / (n ** (1 / 3)).sum())
    fixed = build_sampler("fixed", weights=[2.0, 1.0, 1.0]).probabilities(SIZES, 1, 5)
    assert np.allclose(fixed, [0.5, 0.25, 0.25])
    # very large datasets: no overflow
    big = build_sampler("proportional").probabilities([10**12, 10**12], 1, 1)
    assert np.allclose(big, [0.5, 0.5])


def test_annealed_schedule_of_stickland_and_murray() -> None:
    """α = 1 − 0.8·(e − 1)/(E − 1): proportional at the first epoch, n^0.2 at the last."""
    sampler = build_sampler("annealed")
    n = np.array(SIZES, dtype=float)
    assert np.allclose(sampler.probabilities(SIZES, 1, 10), n / n.sum())
    assert np.allclose(sampler.probabilities(SIZES, 10, 10), n**0.2 / (n**0.2).sum())
    assert AnnealedSampler.alpha(4, 10) == pytest.approx(1 - 0.8 * 3 / 9)
    middle = sampler.probabilities(SIZES, 6, 11)  # α = 0.6
    assert np.allclose(middle, n**0.6 / (n**0.6).sum())
    assert np.allclose(sampler.probabilities(SIZES, 1, 1), n / n.sum())  # one epoch: α = 1


@pytest.mark.parametrize("mode", ["single", "mixed"])
@pytest.mark.parametrize("name", SAMPLERS.names())
def test_drawn_frequencies_match_the_sampler(name: str, mode: str) -> None:
    """Over many draws the share of each dataset matches the sampler's probabilities (chi-square
    goodness of fit); the same counts are far from another sampler's probabilities."""
    weights = [0.2, 0.5, 0.3] if name == "fixed" else None
    sampler = build_sampler(name, weights=weights)
    steps, batch = (3000, 1) if mode == "single" else (150, 20)
    mixer = _mixer(
        sampler=sampler, batch_mode=mode, batch_size=batch, epoch=f"steps:{steps}", total_epochs=5
    )
    which = _dataset_of_each_sample(mixer, epoch=3)
    counts = np.bincount(which, minlength=3)
    draws = steps if mode == "single" else steps * batch
    if mode == "single":  # one dataset per batch
        counts = counts // batch
    p = mixer.probabilities()
    assert counts.sum() == draws
    if name == "round_robin":  # a deterministic cycle, continued across epochs
        assert counts.max() - counts.min() <= 1
        first = which[:: batch if mode == "single" else 1][:6]
        start = (2 * steps) % 3 if mode == "single" else (2 * steps * batch) % 3
        assert first.tolist() == [(start + i) % 3 for i in range(6)]
        return
    assert chisquare(counts, draws * p).pvalue > 1e-3, (counts, draws * p)
    other = np.array([1 / 3] * 3) if name != "uniform" else np.array(SIZES) / sum(SIZES)
    assert chisquare(counts, draws * other).pvalue < 1e-6  # the test can tell samplers apart


def test_small_datasets_are_repeated_evenly_within_an_epoch() -> None:
    """Oversampling reads a small dataset in fresh shuffled passes: every sample equally often."""
    mixer = _mixer(sampler="uniform", batch_mode="single", batch_size=4, epoch="steps:300")
    mixer.set_epoch(1)
    rows = torch.cat([x[x[:, 0] == 1, 1] for x, _ in mixer]).long()
    per_sample = torch.bincount(rows, minlength=40)
    assert per_sample.max() - per_sample.min() <= 1  # 40 samples drawn ~10 times each


def test_fixed_sampler_errors_name_the_dataset() -> None:
    with pytest.raises(ConfigError, match="no weight for dataset 'ds2'"):
        _mixer(sampler=build_sampler("fixed", weights={"ds0": 1.0, "ds1": 1.0}))
    with pytest.raises(ConfigError, match="dataset 'ds1' needs a weight >= 0, found -1"):
        _mixer(sampler=build_sampler("fixed", weights=[1.0, -1.0, 1.0]))
    with pytest.raises(ConfigError, match="2 weight\\(s\\) for 3 datasets"):
        _mixer(sampler=build_sampler("fixed", weights=[1.0, 1.0]))
    with pytest.raises(ConfigError, match="sum to 0"):
        _mixer(sampler=build_sampler("fixed", weights=[0.0, 0.0, 0.0]))
    with pytest.raises(ConfigError, match="sampler 'fixed' needs weights"):
        build_sampler("fixed")
    named = _mixer(sampler=build_sampler("fixed", weights={"ds2": 1.0, "ds0": 3.0, "ds1": 0.0}))
    assert np.allclose(named.probabilities(), [0.75, 0.0, 0.25])
    with pytest.raises(ConfigError, match="unknown sampler 'nope'; known: annealed, fixed"):
        build_sampler("nope")
    with pytest.raises(ConfigError, match=r"unknown parameter 'tau'.*temperature"):
        build_sampler("temperature", {"tau": 2})


# ---------------------------------------------------------------------------------- epochs
def test_epoch_definitions() -> None:
    assert parse_epoch("steps:7") == ("steps", 7)
    for bad in ("steps:0", "steps", "all", "steps:-3"):
        with pytest.raises(ConfigError, match="expected 'steps:N'"):
            parse_epoch(bad)
    assert epoch_steps("steps:7", SIZES, 8) == 7
    assert epoch_steps("largest", SIZES, 8) == 50
    assert epoch_steps("smallest", SIZES, 8) == 1
    assert epoch_steps("sum", SIZES, 8) == math.ceil(444 / 8)
    # the epoch counts global batches: two processes of 4 draw what one of 8 draws
    assert len(_mixer(epoch="largest", batch_size=4, world_size=2)) == 50
    assert len(_mixer(epoch="sum", batch_size=8)) == 56


# ---------------------------------------------------------------------------------- labels
@pytest.mark.parametrize("mode", ["single", "mixed"])
def test_absent_tasks_are_missing_and_contribute_zero(mode: str) -> None:
    mixer = _mixer(batch_mode=mode, sampler="uniform", batch_size=16)
    mixer.set_epoch(1)
    for x, y in mixer:
        assert set(y) == {"a", "b", "c"}
        assert y["a"].dtype == torch.float32 and y["a"].shape == (16,)
        assert y["b"].dtype == torch.int64 and y["b"].shape == (16,)
        assert y["c"].shape == (16, 2)
        source = x[:, 0].long()
        assert torch.isnan(y["a"][source != 0]).all()
        assert (y["b"][source != 1] == -1).all()
        assert torch.isnan(y["c"][source != 2]).all()
        assert (y["b"][source == 1] >= 0).all() and (y["c"][source == 2] == 1).all()
        if mode == "single":  # a batch of one dataset: the other tasks' losses are exactly 0
            absent = [t for d, t in enumerate(TASKS) if d != int(source[0])]
            for task in absent:
                output = torch.randn(16, task.output_dim).squeeze(-1)
                if task.kind == "multilabel":
                    output = torch.randn(16, 2)
                loss, count = task.compute_loss(output, y[task.name])
                assert float(loss) == 0.0 and int(count) == 0


def test_seen_counts_count_labelled_samples_per_task() -> None:
    mixer = _mixer(batch_mode="mixed", sampler="uniform", batch_size=10, epoch="steps:30")
    mixer.set_epoch(1)
    expected = dict.fromkeys("abc", 0)
    for _, y in mixer:
        expected["a"] += int(torch.isfinite(y["a"]).sum())
        expected["b"] += int((y["b"] >= 0).sum())
        expected["c"] += int(torch.isfinite(y["c"]).all(dim=1).sum())
    assert mixer.seen_counts() == expected
    assert 0 < expected["a"] < 100  # one in five labels of task a is missing
    mixer.set_epoch(2)
    assert mixer.seen_counts() == {"a": 0, "b": 0, "c": 0}


def test_errors_name_the_dataset_or_task() -> None:
    datasets = _datasets()
    with pytest.raises(DataError, match="task 'c' has no dataset"):
        MultiTaskMixer(datasets[:2], TASKS, 4)
    odd = TaskDataset("odd", MultiLabelDataset(torch.zeros(5, 3), {"a": torch.zeros(5)}), ("a",))
    with pytest.raises(DataError, match="batch_mode 'mixed' needs one input layout: dataset 'odd'"):
        MultiTaskMixer([*datasets, odd], TASKS, 4, batch_mode="mixed")
    MultiTaskMixer([*datasets, odd], TASKS, 4, batch_mode="single")  # one dataset per batch: ok
    wrong = TaskDataset("w", MultiLabelDataset(torch.zeros(5, 2), {"a": torch.zeros(5)}), ("b",))
    with pytest.raises(DataError, match="dataset 'w': no labels for its task 'b'"):
        MultiTaskMixer([*datasets, wrong], TASKS, 4)


# ---------------------------------------------------------------------------------- resume
def _draw(mixer: MultiTaskMixer, epoch: int, limit: int | None = None) -> list[torch.Tensor]:
    mixer.set_epoch(epoch)
    out = []
    for x, y in mixer:
        out.append(torch.cat([x.flatten(), y["a"].nan_to_num(-9), y["b"].float()]))
        if limit is not None and len(out) == limit:
            break
    return out


@pytest.mark.parametrize("mode", ["single", "mixed"])
def test_the_draw_depends_only_on_seed_and_epoch(mode: str) -> None:
    one = _mixer(batch_mode=mode, sampler="annealed", total_epochs=4)
    two = _mixer(batch_mode=mode, sampler="annealed", total_epochs=4)
    full = [_draw(one, e) for e in (1, 2, 3)]
    assert all(torch.equal(a, b) for a, b in zip(full[2], _draw(two, 3), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(full[1], full[2], strict=True))
    other_seed = _draw(_mixer(batch_mode=mode, sampler="annealed", total_epochs=4, seed=4), 3)
    assert not all(torch.equal(a, b) for a, b in zip(full[2], other_seed, strict=True))


@pytest.mark.parametrize("mode", ["single", "mixed"])
def test_resume_mid_epoch_draws_the_same_batches(mode: str) -> None:
    full = _mixer(batch_mode=mode, sampler="temperature")
    expected = _draw(full, 2)
    expected_seen = full.seen_counts()

    cut = _mixer(batch_mode=mode, sampler="temperature")
    _draw(cut, 2, limit=17)
    state = json.loads(json.dumps(cut.state_dict()))  # JSON-ready, as in a checkpoint
    assert state["epoch"] == 2 and state["position"] == 17

    resumed = _mixer(batch_mode=mode, sampler="temperature")
    resumed.load_state_dict(state)
    rest = _draw(resumed, 2)
    assert len(rest) == len(expected) - 17
    assert all(torch.equal(a, b) for a, b in zip(rest, expected[17:], strict=True))
    assert resumed.seen_counts() == expected_seen  # the epoch's report counts the first part too
    # the next epoch starts from its beginning
    assert len(_draw(resumed, 3)) == len(expected)


def test_state_from_other_settings_is_refused() -> None:
    state = _mixer(seed=3).state_dict()
    with pytest.raises(DataError, match="seed was 3 when saved, now 4"):
        _mixer(seed=4).load_state_dict(state)
    with pytest.raises(DataError, match="sizes was"):
        _mixer(datasets=_datasets([400, 40, 5])).load_state_dict(state)


# ---------------------------------------------------------------------------------- DDP
@pytest.mark.parametrize("mode", ["single", "mixed"])
def test_ddp_shares_are_disjoint_and_their_union_is_the_single_process_draw(mode: str) -> None:
    single = _mixer(batch_mode=mode, batch_size=8, sampler="uniform")
    ranks = [_mixer(batch_mode=mode, batch_size=4, world_size=2, rank=0, sampler="uniform")]
    ranks.append(_mixer(batch_mode=mode, batch_size=4, world_size=2, rank=1, sampler="uniform"))
    for epoch in (1, 2):
        for mixer in (single, *ranks):
            mixer.set_epoch(epoch)
        steps = 0
        for (x, y), (x0, y0), (x1, y1) in zip(single, *ranks, strict=True):
            assert len(x0) == len(x1) == 4
            assert torch.equal(torch.cat([x0, x1]), x)  # contiguous shares of one global batch
            for task in ("a", "b", "c"):
                both = torch.cat([y0[task], y1[task]])
                assert torch.equal(both.nan_to_num(-9), y[task].nan_to_num(-9))
            steps += 1
        assert steps == len(single) == len(ranks[0])
        assert single.seen_counts() == ranks[0].seen_counts() == ranks[1].seen_counts()


# ---------------------------------------------------------------------------------- bundles
def _table(n: int, task: str, *, offset: float, dim: int = 3, kind: str = "regression"):
    rng = np.random.default_rng(n)
    x = rng.standard_normal((n, dim)).astype(np.float32) + offset
    if kind == "regression":
        y = x.sum(axis=1).astype(np.float32)
        spec = TaskSpec(task, "regression")
    else:
        y = (x[:, 0] > offset).astype(np.int64)
        spec = TaskSpec(task, "multiclass", num_classes=2)
    return MultiLabelTable(x, {task: y}, [spec], source=f"table-{task}")


def test_mixed_bundle_stacks_tables_with_missing_labels_and_one_preprocessing() -> None:
    bundle = build_bundle(
        [("big", _table(200, "r", offset=0.0)), ("small", _table(20, "k", offset=5.0, kind="c"))],
        seed=0,
    )
    assert [t.name for t in bundle.tasks] == ["r", "k"]
    parts = train_parts(bundle)
    assert [(p.name, len(p), tuple(p.tasks)) for p in parts] == [
        ("big", 140, ("r",)),
        ("small", 14, ("k",)),
    ]
    assert torch.isfinite(parts[0].data.targets["r"]).all()
    assert (parts[0].data.targets["k"] == -1).all() and (parts[1].data.targets["k"] >= 0).all()
    assert torch.isnan(parts[1].data.targets["r"]).all()
    # one standardisation fitted on the union of the training rows: the small table stays apart
    assert abs(float(bundle.train.inputs.mean())) < 1e-5
    assert float(parts[1].data.inputs.mean()) > 2.0
    # the regression target scale comes from its own labelled rows
    assert bundle.tasks[0].target_std is not None and bundle.tasks[0].target_std[0] > 1.0
    assert bundle.info["datasets"][1]["sizes"] == {"train": 14, "val": 3, "test": 3}
    assert len(bundle.val) == 33 and len(bundle.test) == 33


def test_mixed_bundle_errors_name_the_dataset() -> None:
    with pytest.raises(DataError, match="dataset 'b': input layout \\(4,\\) differs from dataset"):
        build_bundle([("a", _table(20, "r", offset=0)), ("b", _table(20, "s", offset=0, dim=4))])
    clash = _table(20, "r", offset=0, kind="c")
    with pytest.raises(DataError, match="task 'r' is defined differently in dataset 'b'"):
        build_bundle([("a", _table(20, "r", offset=0)), ("b", clash)])


def test_evaluation_batches_score_each_task_on_its_own_dataset() -> None:
    datasets = _datasets()
    model = build_model(TASKS, (2,), encoder="mlp", encoder_params={"hidden": [4]})
    batches = list(evaluation_batches(datasets, TASKS, 64))
    assert sum(len(x) for x, _ in batches) == sum(SIZES)
    metrics = evaluate(model, batches, TASKS)
    assert set(metrics) == {"a", "b", "c"}
    assert all(math.isfinite(m["loss"]) for m in metrics.values())


# ---------------------------------------------------------------------------------- config
def _two_datasets(tmp_path: Path, **data: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "name": "mix",
        "seed": 0,
        "output_dir": str(tmp_path / "runs"),
        "data": {
            "datasets": [
                {
                    "dataset": "mmoe-synthetic",
                    "params": {"num_samples": 2000, "input_dim": 8, "correlation": 0.9},
                    "tasks": ["t1"],
                },
                {
                    "dataset": "mmoe-synthetic",
                    "params": {"num_samples": 20, "input_dim": 8, "correlation": 0.9},
                    "tasks": ["t2"],
                },
            ],
            "batch_size": 64,
            **data,
        },
        "model": {"encoder": "mlp", "encoder_params": {"hidden": [16]}},
        "optimizer": {"lr": 0.01},
        "train": {"epochs": 3, "progress": False},
    }
    return raw


def test_config_errors_name_the_field(tmp_path: Path) -> None:
    raw = _two_datasets(tmp_path, sampler={"name": "fixed"})
    raw["data"]["datasets"][0]["weight"] = 1.0
    with pytest.raises(ConfigError, match=r"data.datasets.1.weight: the fixed sampler needs"):
        parse_config(raw)
    raw = _two_datasets(tmp_path, sampler={"name": "temperature", "params": {"t": 2}})
    raw["data"]["datasets"][1]["dataset"] = "nope"
    raw["data"]["datasets"][0]["weight"] = 1.0
    raw["data"]["epoch"] = "forever"
    with pytest.raises(ConfigError) as info:
        parse_config(raw, source="x.yaml")
    message = str(info.value)
    assert "4 problems" in message
    assert "data.datasets.1.dataset: unknown dataset 'nope'" in message
    assert "data.datasets.0.weight: only used by the fixed sampler" in message
    assert "data.sampler.params: unknown parameter 't' for sampler 'temperature'" in message
    assert "data.epoch: expected 'steps:N'" in message
    raw = _two_datasets(tmp_path, sampler={"name": "tempered"}, dataset="mmoe-synthetic")
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    assert "data: give data.dataset or data.datasets, not both" in str(info.value)
    assert "data.sampler.name: unknown sampler 'tempered'; known: annealed" in str(info.value)
    del raw["data"]["datasets"]
    del raw["data"]["dataset"]
    with pytest.raises(ConfigError, match=r"data\.dataset: required"):
        parse_config(raw)


def test_unknown_task_of_an_entry_names_it(tmp_path: Path) -> None:
    raw = _two_datasets(tmp_path)
    raw["data"]["datasets"][1]["tasks"] = ["t9"]
    with pytest.raises(ConfigError, match=r"data.datasets.1.tasks: unknown task\(s\) t9"):
        train_run(parse_config(raw))


# ---------------------------------------------------------------------------------- end to end
def _records(run_dir: Path) -> list[dict[str, Any]]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for record in records:
        for key in ("time_s", "train_time_s", "data_wait_fraction"):
            record.pop(key, None)
    return records


def test_two_datasets_of_100_to_1_train_end_to_end(tmp_path: Path) -> None:
    raw = _two_datasets(tmp_path, sampler={"name": "temperature", "params": {"temperature": 2}})
    result = train_run(parse_config(raw))
    assert set(result.test) == {"t1", "t2"}
    assert all(math.isfinite(result.test[t]["rmse"]) for t in ("t1", "t2"))
    records = _records(result.run_dir)
    assert len(records) == 3
    n1, n2 = 1400, 14  # training sizes
    steps = math.ceil((n1 + n2) / 64)  # epoch "sum"
    p2 = math.sqrt(n2) / (math.sqrt(n1) + math.sqrt(n2))
    for record in records:
        seen = record["seen"]
        assert seen["t1"] + seen["t2"] == steps * 64
        mean, sd = steps * 64 * p2, math.sqrt(steps * 64 * p2 * (1 - p2))
        assert abs(seen["t2"] - mean) < 5 * sd
    run = json.loads((result.run_dir / "run.json").read_text())
    assert [d["tasks"] for d in run["data"]["datasets"]] == [["t1"], ["t2"]]
    assert evaluate_run(result.run_dir).test == result.test  # `polytask evaluate` rebuilds it


def test_interrupted_multi_dataset_run_resumes_identically(tmp_path: Path) -> None:
    class Interrupt(Exception):
        pass

    raw = _two_datasets(tmp_path, sampler={"name": "annealed"}, batch_mode="single")
    raw["model"]["encoder_params"]["dropout"] = 0.1
    full = train_run(parse_config(raw), run_dir=tmp_path / "full")

    def stop(record: dict[str, Any]) -> None:
        if record["epoch"] == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        train_run(parse_config(copy.deepcopy(raw)), run_dir=tmp_path / "cut", callbacks=[stop])
    resumed = resume_run(tmp_path / "cut", progress=False)
    assert resumed.test == full.test
    assert _records(tmp_path / "cut") == _records(tmp_path / "full")


def test_single_task_baselines_use_only_the_datasets_of_their_task(tmp_path: Path) -> None:
    raw = _two_datasets(tmp_path)
    raw["train"]["epochs"] = 1
    raw["evaluate"] = {"baselines": True}
    result = train_with_baselines(parse_config(raw))
    assert result.baselines is not None and set(result.baselines) == {"t1", "t2"}
    assert result.delta_m is not None and math.isfinite(result.delta_m)
    run = json.loads((result.run_dir / "baselines" / "t2" / "run.json").read_text())
    assert [d["tasks"] for d in run["data"]["datasets"]] == [["t2"]]


def _ddp_worker(rank: int, port: int, raw: dict[str, Any], run_dir: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE="2",
    )
    torch.set_num_threads(1)
    train_run(parse_config(raw), run_dir=Path(run_dir))
    dist.destroy_process_group()


def test_two_processes_draw_what_one_process_draws(tmp_path: Path) -> None:
    """`torchrun`-style: 2 gloo processes of batch B train a two-dataset run to the end, with the
    samples-seen report of one process with batch 2B."""
    # every process must update (and so synchronise) every task's metrics, even when its shard
    # of the validation split holds none of that task's rows
    task = TaskSpec("r", "regression")
    metrics = task.make_metrics()
    task.update_metrics(metrics, torch.zeros(3), torch.full((3,), float("nan")))
    assert all(m.update_called for m in metrics.values())
    raw = _two_datasets(tmp_path, batch_size=32)
    raw["train"]["epochs"] = 2
    run_processes(_ddp_worker, (free_port(), raw, str(tmp_path / "ddp")))
    raw["data"]["batch_size"] = 64
    train_run(parse_config(raw), run_dir=tmp_path / "one")
    ddp, one = _records(tmp_path / "ddp"), _records(tmp_path / "one")
    assert [r["seen"] for r in ddp] == [r["seen"] for r in one]
    assert all(r["val"]["t2"]["rmse"] is not None for r in ddp)
