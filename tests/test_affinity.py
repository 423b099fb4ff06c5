"""Task affinity (lookahead, Fifty et al. 2021) and the best split of tasks into groups."""

from __future__ import annotations

import copy
import json
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import html5lib
import numpy as np
import pytest
import torch
import yaml

from polytask.analysis.affinity import LookaheadAffinity, task_affinity
from polytask.analysis.grouping import best_splits, split_total
from polytask.config import parse_config
from polytask.errors import ConfigError
from polytask.models import build_model
from polytask.tasks import TaskSpec


# ----------------------------------------------------------------------------- grouping
def _partitions(items: list[int]) -> Iterator[list[list[int]]]:
    """Every set partition of ``items`` (brute force, independent of the DP)."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for smaller in _partitions(rest):
        for n in range(len(smaller)):
            yield [*smaller[:n], [first, *smaller[n]], *smaller[n + 1 :]]
        yield [[first], *smaller]


def _brute_force(matrix: np.ndarray, groups: int) -> float:
    return max(
        split_total(matrix, p) for p in _partitions(list(range(len(matrix)))) if len(p) == groups
    )


@pytest.mark.parametrize("k", [2, 4, 6, 7])
def test_exhaustive_split_matches_brute_force(k: int) -> None:
    rng = np.random.default_rng(k)
    matrix = rng.normal(size=(k, k))
    names = [f"t{i}" for i in range(k)]
    splits = best_splits(matrix, names, k)
    assert [len(s.groups) for s in splits] == list(range(1, k + 1))
    for g, split in enumerate(splits, start=1):
        assert split.exhaustive
        assert split.total == pytest.approx(_brute_force(matrix, g), abs=1e-12)
        index = [[names.index(t) for t in group] for group in split.groups]
        assert split.total == pytest.approx(split_total(matrix, index))
        assert sorted(t for group in split.groups for t in group) == sorted(names)


def test_a_task_alone_scores_zero_and_a_hurt_task_leaves() -> None:
    # a and b help each other, c is hurt by both and hurts them
    matrix = np.array([[0, 0.5, -0.4], [0.6, 0, -0.4], [-0.3, -0.3, 0]])
    one, two, three = best_splits(matrix, ["a", "b", "c"], 3)
    assert one.groups == [["a", "b", "c"]]
    assert one.total == pytest.approx((0.6 - 0.3) / 2 + (0.5 - 0.3) / 2 + (-0.8) / 2)
    assert two.groups == [["a", "b"], ["c"]] and two.total == pytest.approx(1.1)
    assert three.groups == [["a"], ["b"], ["c"]] and three.total == 0.0


def _planted(blocks: int, size: int, seed: int) -> tuple[np.ndarray, list[list[int]]]:
    """Affinity high within planted blocks, negative across, plus noise."""
    rng = np.random.default_rng(seed)
    k = blocks * size
    order = rng.permutation(k)
    truth = [sorted(order[b * size : (b + 1) * size].tolist()) for b in range(blocks)]
    block = np.empty(k, dtype=int)
    for b, members in enumerate(truth):
        block[members] = b
    matrix = np.where(block[:, None] == block[None, :], 1.0, -0.5)
    return matrix + 0.2 * rng.normal(size=(k, k)), truth


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_recovers_planted_blocks_beyond_ten_tasks(seed: int) -> None:
    matrix, truth = _planted(3, 4, seed)  # 12 tasks: greedy
    names = [f"t{i}" for i in range(12)]
    split = best_splits(matrix, names, 3)[2]
    assert not split.exhaustive
    assert sorted(split.groups) == sorted([[names[i] for i in g] for g in truth])


def test_greedy_is_close_to_exhaustive_on_random_matrices() -> None:
    rng = np.random.default_rng(3)
    for _ in range(5):
        matrix = rng.normal(size=(8, 8))
        names = [f"t{i}" for i in range(8)]
        exact = best_splits(matrix, names, 4)
        greedy = best_splits(matrix, names, 4, exhaustive_up_to=0)
        for e, g in zip(exact, greedy, strict=True):
            assert not g.exhaustive and len(g.groups) == len(e.groups)
            assert g.total <= e.total + 1e-12  # never better than the optimum
            assert g.total >= e.total - 0.5 * abs(e.total) - 0.5  # and not far from it


def test_bad_affinity_matrices_are_refused() -> None:
    with pytest.raises(ConfigError, match="square"):
        best_splits(np.zeros((2, 3)), ["a", "b"], 2)
    with pytest.raises(ConfigError, match="2 tasks in the matrix, 3 names"):
        best_splits(np.zeros((2, 2)), ["a", "b", "c"], 2)
    with pytest.raises(ConfigError, match="finite"):
        best_splits(np.array([[0, math.nan], [0, 0]]), ["a", "b"], 2)
    with pytest.raises(ConfigError, match="groups: must be >= 1"):
        best_splits(np.zeros((2, 2)), ["a", "b"], 0)


# ----------------------------------------------------------------------------- lookahead affinity
def test_lookahead_affinity_matches_a_step_taken_by_hand() -> None:
    torch.manual_seed(0)
    tasks = [TaskSpec("a", "regression"), TaskSpec("b", "binary"), TaskSpec("c", "regression")]
    model = build_model(tasks, (5,), encoder_params={"hidden": [7]})
    x = torch.randn(16, 5)
    y = {"a": torch.randn(16), "b": (torch.rand(16) > 0.5).float(), "c": torch.randn(16)}
    y["c"][:] = math.nan  # no label of c in this batch: its row and column stay unmeasured
    meter = LookaheadAffinity(model, tasks, lookahead_lr=0.05)
    meter.measure(x, y)
    matrix = meter.matrix()
    assert np.isnan(matrix[2]).all() and np.isnan(matrix[:, 2]).all()

    def loss(net: torch.nn.Module, task: TaskSpec) -> torch.Tensor:
        return task.compute_loss(net(x).outputs[task.name], y[task.name])[0]

    for i in range(2):
        stepped = copy.deepcopy(model)
        shared = stepped.shared_parameters()
        grads = torch.autograd.grad(loss(stepped, tasks[i]), shared)
        with torch.no_grad():
            for p, g in zip(shared, grads, strict=True):
                p -= 0.05 * g
            for j in range(2):
                expected = 1 - loss(stepped, tasks[j]) / loss(model, tasks[j])
                assert matrix[i, j] == pytest.approx(float(expected), abs=1e-6)
    assert matrix[0, 0] > 0 and matrix[1, 1] > 0  # a step on a task lowers its own loss
    assert model.training  # the training mode is given back


def _block_config(seed: int, output_dir: Path | None = None) -> Any:
    raw = {
        "name": "blocks",
        "seed": seed,
        "data": {
            "dataset": "mmoe-synthetic",
            # two blocks {t1, t2} and {t3, t4}: correlated within, independent across
            "params": {
                "num_samples": 800,
                "num_tasks": 4,
                "blocks": 2,
                "correlation": 0.9,
                "input_dim": 16,
                "num_sin": 0,
            },
            "batch_size": 64,
        },
        "model": {"encoder": "mlp", "encoder_params": {"hidden": [32]}},
        "optimizer": {"name": "adamw", "lr": 0.01},
        "train": {"epochs": 2, "progress": False},
    }
    if output_dir is not None:
        raw["output_dir"] = str(output_dir)
    return parse_config(raw, source="blocks")


def test_two_groups_recover_the_blocks_of_mmoe_synthetic() -> None:
    recovered = 0
    for seed in range(5):
        result = task_affinity(_block_config(seed), steps=30, groups=2, lookahead_lr=0.1)
        recovered += result.splits[1].groups == [["t1", "t2"], ["t3", "t4"]]
        within = result.affinity[0, 1] + result.affinity[1, 0] + result.affinity[2, 3]
        across = result.affinity[0, 2] + result.affinity[1, 3] + result.affinity[3, 0]
        assert within > across, seed
    assert recovered >= 4


def test_the_block_parameter_makes_blocks_independent() -> None:
    from polytask.data.sources.synthetic import mmoe_parameters

    params = mmoe_parameters(
        num_tasks=5, input_dim=8, correlation=0.7, scale=1.0, num_sin=0, seed=0, blocks=2
    )
    w = params.weights
    cosine = (w @ w.T) / np.outer(np.linalg.norm(w, axis=1), np.linalg.norm(w, axis=1))
    blocks = [0, 0, 0, 1, 1]  # 5 tasks in 2 blocks: sizes 3 and 2
    for i in range(5):
        for j in range(5):
            expected = 1.0 if i == j else (0.7 if blocks[i] == blocks[j] else 0.0)
            assert cosine[i, j] == pytest.approx(expected, abs=1e-9)
    with pytest.raises(ConfigError, match=r"blocks must be in 1\.\.num_tasks"):
        mmoe_parameters(
            num_tasks=2, input_dim=8, correlation=0.5, scale=1.0, num_sin=0, seed=0, blocks=3
        )


def test_affinity_command_writes_table_heatmap_and_trains_the_groups(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from polytask.cli import app

    config = tmp_path / "blocks.yaml"
    raw = _block_config(1, tmp_path / "runs").model_dump(mode="json")
    raw["data"]["params"]["num_tasks"] = 3
    raw["data"]["params"]["num_samples"] = 600
    raw["train"]["epochs"] = 1
    config.write_text(yaml.safe_dump(raw))
    out = tmp_path / "aff"
    args = ["affinity", str(config), "--steps", "30", "--groups", "2", "--lookahead-lr", "0.1"]
    result = CliRunner().invoke(
        app, [*args, "--train-groups", "--output", str(out), "--no-progress"]
    )
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "affinity.json").read_text())
    assert saved["tasks"] == ["t1", "t2", "t3"] and len(saved["affinity"]) == 3
    assert [len(s["groups"]) for s in saved["splits"]] == [1, 2]
    best = max(saved["splits"], key=lambda s: (s["total_affinity"], -len(s["groups"])))
    assert saved["suggested"] == best["groups"] and len(best["groups"]) == 2
    assert [t["groups"] for t in saved["trained"]] == [[["t1", "t2", "t3"]], best["groups"]]
    assert all(math.isfinite(t["delta_m"]) for t in saved["trained"])
    for index, group in enumerate(best["groups"], start=1):
        trained = out / "groups-blocks" / f"group{index}-{'-'.join(group)}" / "results.json"
        assert trained.is_file() == (len(group) == 2)  # a lone task is its baseline
    assert (out / "affinity.png").read_bytes()[:4] == b"\x89PNG"
    page = (out / "affinity.html").read_text()
    html5lib.HTMLParser(strict=True).parse(page)
    assert "Trained groupings" in page and re.search(r"https?://", page) is None
    shown = " · ".join("{" + ", ".join(g) + "}" for g in saved["splits"][1]["groups"])
    assert f"| 2 | {shown} |" in (out / "affinity.md").read_text()


def test_affinity_refuses_a_single_task_and_bad_steps(tmp_path: Path) -> None:
    one = _block_config(0).model_copy(deep=True)
    one = one.model_copy(update={"data": one.data.model_copy(update={"tasks": ["t1"]})})
    with pytest.raises(ConfigError, match="at least two tasks"):
        task_affinity(one, steps=2)
    with pytest.raises(ConfigError, match="--steps: must be >= 1"):
        task_affinity(_block_config(0), steps=0)
