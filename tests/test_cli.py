"""The command line end to end on a tiny config (seconds), and every kind of bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from polytask.cli import app
from polytask.run.recipes import RECIPES_DIR

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def _one_error_line(result) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    return result.output


def test_train_evaluate_predict_end_to_end(tiny_yaml: Path, tmp_path: Path) -> None:
    result = run("train", tiny_yaml, "--single-task", "--no-progress", "train.epochs=2")
    assert result.exit_code == 0, result.output
    assert "t1" in result.output and "rmse" in result.output and "Δm%" in result.output
    run_dir = tmp_path / "runs" / "tiny"
    saved = json.loads((run_dir / "results.json").read_text())
    assert set(saved["baselines"]) == {"t1", "t2"} and "delta_m" in saved
    assert (run_dir / "baselines" / "t1" / "checkpoints" / "best.safetensors").is_file()

    # evaluate reuses the cached baselines and reproduces the test metrics
    evaluated = run("evaluate", run_dir)
    assert evaluated.exit_code == 0, evaluated.output
    assert f"{saved['delta_m']:+.2f}" in evaluated.output

    # predict: the run's feature columns in, one column per task out
    from polytask.data.sources import DATASETS

    table = DATASETS.get("mmoe-synthetic")(seed=0, num_samples=20, input_dim=16)
    frame = pd.DataFrame(table.inputs, columns=table.feature_names)
    frame.insert(0, "id", range(20))  # extra columns are ignored
    inputs = tmp_path / "in.csv"
    frame.to_csv(inputs, index=False)
    out = tmp_path / "out.parquet"
    predicted = run("predict", run_dir, inputs, "--output", out)
    assert predicted.exit_code == 0, predicted.output
    preds = pd.read_parquet(out)
    assert list(preds.columns) == ["t1", "t2"] and len(preds) == 20
    assert np.isfinite(preds.to_numpy()).all()


def test_a_second_run_does_not_overwrite_the_first(tiny_yaml: Path, tmp_path: Path) -> None:
    for _ in range(2):
        assert run("train", tiny_yaml, "--no-progress", "train.epochs=1").exit_code == 0
    assert (tmp_path / "runs" / "tiny").is_dir() and (tmp_path / "runs" / "tiny-2").is_dir()


def test_resume_from_cli(tiny_yaml: Path, tmp_path: Path) -> None:
    assert run("train", tiny_yaml, "--no-progress", "train.epochs=1").exit_code == 0
    resumed = run("train", "--resume", tmp_path / "runs" / "tiny", "--no-progress")
    assert resumed.exit_code == 0, resumed.output


def test_bad_config_inputs(tiny_yaml: Path, tmp_path: Path, tiny_raw: dict) -> None:
    out = _one_error_line(run("train", tmp_path / "missing.yaml"))
    assert "missing.yaml: no such config file" in out
    out = _one_error_line(run("train", tiny_yaml, "model.encoder=nope"))
    assert "model.encoder: unknown encoder 'nope'; known: " in out and "mlp, resnet" in out
    out = _one_error_line(run("train", tiny_yaml, "train.epochs=many"))
    assert "train.epochs" in out and "valid integer" in out
    out = _one_error_line(run("train", tiny_yaml, "balancing.method=magic"))
    assert "unknown balancing method 'magic'" in out and "uncertainty" in out
    out = _one_error_line(run("evaluate", tmp_path / "nowhere"))
    assert "not a polytask run folder" in out or "no checkpoints" in out


def _csv_config(tmp_path: Path, tiny_raw: dict, frame: pd.DataFrame) -> Path:
    data = tmp_path / "data.csv"
    frame.to_csv(data, index=False)
    tiny_raw["data"] = {
        "dataset": "file",
        "params": {
            "path": str(data),
            "tasks": [
                {"name": "kind", "kind": "multiclass", "num_classes": 3},
                {"name": "price", "kind": "regression"},
            ],
        },
        "batch_size": 8,
    }
    path = tmp_path / "csv.yaml"
    path.write_text(yaml.safe_dump(tiny_raw))
    return path


def _frame(n: int = 60) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 3))
    kind = (x[:, 0] > 0).astype(int) + (x[:, 1] > 1).astype(int)
    price = 3 * x[:, 2] + rng.normal(size=n)
    return pd.DataFrame({"a": x[:, 0], "b": x[:, 1], "c": x[:, 2], "kind": kind, "price": price})


def test_user_csv_trains(tmp_path: Path, tiny_raw: dict) -> None:
    config = _csv_config(tmp_path, tiny_raw, _frame())
    result = run("train", config, "--no-progress")
    assert result.exit_code == 0, result.output
    assert "kind" in result.output and "price" in result.output


def test_csv_missing_label_column(tmp_path: Path, tiny_raw: dict) -> None:
    config = _csv_config(tmp_path, tiny_raw, _frame().drop(columns=["price"]))
    out = _one_error_line(run("train", config, "--no-progress"))
    assert "data.csv" in out and "price" in out


def test_csv_label_out_of_range(tmp_path: Path, tiny_raw: dict) -> None:
    frame = _frame()
    frame.loc[7, "kind"] = 5
    config = _csv_config(tmp_path, tiny_raw, frame)
    out = _one_error_line(run("train", config, "--no-progress"))
    assert "data.csv" in out and "row 8" in out and "kind" in out


def test_predict_missing_feature_column(tiny_yaml: Path, tmp_path: Path) -> None:
    assert run("train", tiny_yaml, "--no-progress", "train.epochs=1").exit_code == 0
    bad = tmp_path / "bad.csv"
    pd.DataFrame({"x0": [1.0]}).to_csv(bad, index=False)
    out = _one_error_line(run("predict", tmp_path / "runs" / "tiny", bad, "-o", tmp_path / "o.csv"))
    assert "bad.csv: missing feature column(s)" in out
    assert not (tmp_path / "o.csv").exists()


def test_listings() -> None:
    methods = run("methods")
    assert methods.exit_code == 0
    for name in ("uncertainty", "equal", "hard_sharing", "cnn", "mlp", "linear"):
        assert name in methods.output
    datasets = run("datasets")
    for name in ("multi-digits", "mmoe-synthetic", "yeast", "solar-flare", "file"):
        assert name in datasets.output


def test_console_entry_point_runs() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "polytask", "--help"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0 and "train" in result.stdout


@pytest.mark.parametrize("config", sorted(RECIPES_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_recipes_start(config: Path, tmp_path: Path) -> None:
    """Every recipe trains one tiny epoch (its data shrunk where the dataset allows)."""
    raw = yaml.safe_load(config.read_text())
    params = raw["data"].setdefault("params", {})
    if raw["data"].get("dataset") == "multi-digits":
        params.update(num_train=200, num_val=50, num_test=50)
    if raw["data"].get("dataset") == "mmoe-synthetic":
        params.update(num_samples=300)
    raw.setdefault("evaluate", {})["baselines"] = False
    raw["train"] = {**raw.get("train", {}), "epochs": 1, "progress": False}
    raw["output_dir"] = str(tmp_path)
    path = tmp_path / config.name
    path.write_text(yaml.safe_dump(raw))
    result = run("train", path, "--no-progress")
    assert result.exit_code == 0, result.output


def test_compare_groups_runs_by_name(tiny_yaml: Path, tmp_path: Path) -> None:
    for seed in (0, 1):
        result = run("train", tiny_yaml, "--no-progress", "train.epochs=1", f"seed={seed}")
        assert result.exit_code == 0, result.output
    md = tmp_path / "cmp.md"
    compared = run(
        "compare", tmp_path / "runs" / "tiny", tmp_path / "runs" / "tiny-2", "--markdown", md
    )
    assert compared.exit_code == 0, compared.output
    text = md.read_text()
    assert "| task | metric | tiny |" in text and "(n=2)" in text and "| t1 | rmse |" in text
    out = _one_error_line(run("compare", tmp_path / "nothing"))
    assert "not a polytask run folder" in out
