"""A task with no labelled sample in a split has no metrics there: NaN (``null`` in
results.json), "no labels" in the printed table, never a 0.0."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml
from typer.testing import CliRunner

from polytask.cli import app
from polytask.data.batches import BatchLoader, MultiLabelDataset
from polytask.evaluate import evaluate
from polytask.models import build_model
from polytask.tasks import TaskSpec


def test_evaluate_gives_nan_for_a_task_without_labels() -> None:
    tasks = [
        TaskSpec("r", "regression"),
        TaskSpec("b", "binary"),
        TaskSpec("m", "multiclass", num_classes=3),
    ]
    torch.manual_seed(0)
    x = torch.randn(20, 4)
    y = {
        "r": torch.full((20,), math.nan),
        "b": torch.full((20,), math.nan),
        "m": torch.full((20,), -1, dtype=torch.long),
    }
    y["r"][:10] = torch.randn(10)  # only `r` is labelled
    model = build_model(tasks, (4,), encoder_params={"hidden": [8]}).eval()
    metrics = evaluate(model, BatchLoader(MultiLabelDataset(x, y), 8), tasks)
    assert all(math.isfinite(v) for v in metrics["r"].values())
    for name in ("b", "m"):  # were 0.0 (accuracy, auroc...) with a NaN loss
        assert metrics[name] and all(math.isnan(v) for v in metrics[name].values()), metrics[name]


def test_a_task_unlabelled_in_the_test_split_shows_no_labels(tmp_path: Path, tiny_raw) -> None:
    rng = np.random.default_rng(0)
    n = 90
    frame = pd.DataFrame({"a": rng.normal(size=n), "b": rng.normal(size=n)})
    frame["y"] = 2 * frame["a"]
    frame["z"] = (frame["b"] > 0).astype(float)
    frame["part"] = ["train"] * 60 + ["val"] * 15 + ["test"] * 15
    frame.loc[frame["part"] == "test", "z"] = np.nan  # no `z` label in the test split
    data = tmp_path / "data.csv"
    frame.to_csv(data, index=False)
    tiny_raw["data"] = {
        "dataset": "file",
        "params": {
            "path": str(data),
            "tasks": [{"name": "y", "kind": "regression"}, {"name": "z", "kind": "binary"}],
            "split_column": "part",
        },
        "batch_size": 16,
    }
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(tiny_raw))
    result: Any = CliRunner().invoke(app, ["train", str(config), "train.epochs=1"])
    assert result.exit_code == 0, result.output
    assert "no labels" in result.output
    saved = json.loads((tmp_path / "runs" / "tiny" / "results.json").read_text())
    assert saved["test"]["z"] and all(v is None for v in saved["test"]["z"].values())
    assert all(isinstance(v, float) for v in saved["test"]["y"].values())
