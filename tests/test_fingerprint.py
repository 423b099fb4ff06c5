"""A run records a fingerprint of its data; evaluating or resuming it on changed data is refused
with one line, and run folders from before fingerprints still evaluate and resume."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from typer.testing import CliRunner

from cli_checks import one_error_line as _one_error_line
from polytask.cli import app
from polytask.train.checkpoint import read_checkpoint_metadata

runner = CliRunner()
FIXTURES = Path(__file__).parent / "fixtures" / "runs-5eec728"


def run(*args: object) -> Any:
    return runner.invoke(app, [str(a) for a in args])


def _csv_run(tmp_path: Path, tiny_raw: dict[str, Any], epochs: int = 1) -> tuple[Path, Path]:
    """A trained run on a CSV file (no split column: the split is drawn by seed over the rows,
    so re-sorting the file changes the test split): (run folder, data file)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(80, 3))
    frame = pd.DataFrame({"a": x[:, 0], "b": x[:, 1], "c": x[:, 2]})
    frame["y"] = 2 * frame["a"] + rng.normal(size=80)
    frame["z"] = (frame["b"] > 0).astype(int)
    data = tmp_path / "data.csv"
    frame.to_csv(data, index=False)
    tiny_raw["data"] = {
        "dataset": "file",
        "params": {
            "path": str(data),
            "tasks": [{"name": "y", "kind": "regression"}, {"name": "z", "kind": "binary"}],
        },
        "batch_size": 16,
    }
    tiny_raw["train"]["epochs"] = epochs
    config = tmp_path / "csv.yaml"
    config.write_text(yaml.safe_dump(tiny_raw))
    result = run("train", config)
    assert result.exit_code == 0, result.output
    return tmp_path / "runs" / "tiny", data


def test_a_run_records_its_file_fingerprint(tmp_path: Path, tiny_raw: dict) -> None:
    run_dir, data = _csv_run(tmp_path, tiny_raw)
    expected = {
        "file": str(data),
        "size": data.stat().st_size,
        "sha256": hashlib.sha256(data.read_bytes()).hexdigest(),
    }
    recorded = json.loads((run_dir / "run.json").read_text())["data"]["datasets"][0]
    assert recorded["fingerprint"] == expected
    meta = read_checkpoint_metadata(run_dir / "checkpoints" / "best.safetensors")["metadata"]
    assert meta["data"]["datasets"][0]["fingerprint"] == expected


def test_a_run_records_a_built_in_dataset_by_name_and_parameters(tiny_yaml: Path, tmp_path):
    assert run("train", tiny_yaml, "train.epochs=1").exit_code == 0
    recorded = json.loads((tmp_path / "runs" / "tiny" / "run.json").read_text())
    assert recorded["data"]["datasets"][0]["fingerprint"] == {
        "dataset": "mmoe-synthetic",
        "params": {"num_samples": 600, "input_dim": 16, "missing_fraction": 0.2},
        "seed": 0,
    }
    assert run("evaluate", tmp_path / "runs" / "tiny").exit_code == 0


def test_evaluate_refuses_a_data_file_that_changed(tmp_path: Path, tiny_raw: dict) -> None:
    run_dir, data = _csv_run(tmp_path, tiny_raw)
    same = run("evaluate", run_dir)
    assert same.exit_code == 0, same.output
    frame = pd.read_csv(data)
    frame.sort_values("a").to_csv(data, index=False)  # same rows, another order: another split
    out = _one_error_line(run("evaluate", run_dir))
    assert f"{data}: changed" in out and "sha256" in out and str(run_dir) in out


def test_resume_refuses_a_data_file_that_changed(tmp_path: Path, tiny_raw: dict) -> None:
    run_dir, data = _csv_run(tmp_path, tiny_raw)
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    config["train"]["epochs"] = 2  # as if stopped after epoch 1 of 2
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    data.write_text(data.read_text() + "0.1,0.2,0.3,1.0,1\n")  # a row added
    out = _one_error_line(run("train", "--resume", run_dir))
    assert f"{data}: changed" in out
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1  # nothing trained


def test_an_old_run_folder_without_a_fingerprint_still_evaluates(tmp_path: Path) -> None:
    old = tmp_path / "tiny-uncertainty"
    shutil.copytree(FIXTURES / "tiny-uncertainty", old)
    assert "fingerprint" not in (old / "run.json").read_text()
    result = run("evaluate", old)
    assert result.exit_code == 0, result.output
