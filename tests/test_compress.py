"""Compression: magnitude pruning with a fine-tuning epoch, dynamic int8 quantization of the
PyTorch model, and the pruned run exported like any other."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from polytask.cli import app
from polytask.errors import ConfigError
from polytask.run.folder import load_trained
from polytask.run.recipes import load_recipe
from polytask.run.single import train_run
from polytask.serve.compress import (
    magnitude_masks,
    quantize_torch,
    serialized_bytes,
    sparsity,
)
from polytask.serve.export import export_onnx
from polytask.serve.onnx_runtime import OnnxPredictor
from polytask.serve.predict import predict_arrays


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    runs = tmp_path_factory.mktemp("compress-runs")
    config = load_recipe(
        "students-csv",
        [
            "train.epochs=2",
            "train.progress=false",
            f"output_dir={runs}",
            "model.encoder_params.hidden=[64,64]",
        ],
    )
    return train_run(config).run_dir


def test_magnitude_masks_zero_the_smallest_weights_globally() -> None:
    model = nn.Sequential(nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 4))
    before = torch.cat([m.weight.detach().abs().flatten() for m in (model[0], model[2])])
    masks = magnitude_masks(model, 0.5)
    assert len(masks) == 2
    assert sparsity(model) == pytest.approx(0.5, abs=0.01)
    kept = torch.cat([m.weight.detach().abs().flatten() for m in (model[0], model[2])])
    assert kept[kept > 0].min() >= before.median()  # the largest half survived
    with pytest.raises(ConfigError, match="prune"):
        magnitude_masks(model, 1.0)


def test_prune_fine_tunes_a_new_run_that_stays_sparse_and_exports(
    teacher: Path, tmp_path: Path
) -> None:
    result = CliRunner().invoke(app, ["compress", str(teacher), "--prune", "0.5"])
    assert result.exit_code == 0, result.output
    pruned_dir = teacher.parent / f"{teacher.name}-pruned50"
    assert json.loads((pruned_dir / "results.json").read_text())["epochs_run"] == 1
    pruned = load_trained(pruned_dir)
    assert sparsity(pruned.model) == pytest.approx(0.5, abs=0.01)  # fine-tuning kept the zeros
    original = load_trained(teacher)
    changed = [
        not torch.equal(a, b)
        for a, b in zip(pruned.model.parameters(), original.model.parameters(), strict=True)
    ]
    assert any(changed)
    exported = OnnxPredictor(
        export_onnx(pruned_dir, tmp_path / "p.onnx", exporter="torchscript").model_path
    )
    features = np.random.default_rng(0).normal(50, 20, size=(64, 4))
    expected = predict_arrays(pruned.model, pruned.tasks, pruned.preprocess(features))
    found = exported.predict({n: features[:, j] for j, n in enumerate(pruned.feature_names or [])})
    for column, values in expected.items():
        np.testing.assert_allclose(found[column], values, rtol=1e-5, atol=1e-5)


def test_torch_int8_quantization_is_smaller_and_close(teacher: Path) -> None:
    trained = load_trained(teacher)
    quantized = quantize_torch(trained.model)
    assert any(
        "Quantized" in type(m).__module__ + type(m).__name__ or "quantized" in type(m).__module__
        for m in quantized.modules()
    )
    assert serialized_bytes(quantized) < 0.75 * serialized_bytes(trained.model)
    features = np.random.default_rng(1).normal(50, 20, size=(200, 4))
    inputs = trained.preprocess(features)
    fp32 = predict_arrays(trained.model, trained.tasks, inputs)
    int8 = predict_arrays(quantized, trained.tasks, inputs)  # type: ignore[arg-type]
    np.testing.assert_allclose(int8["passed"], fp32["passed"], atol=0.03)
    assert (int8["grade"] == fp32["grade"]).mean() > 0.9


def test_compress_cli_quantize_writes_a_report_and_needs_one_option(teacher: Path) -> None:
    result = CliRunner().invoke(app, ["compress", str(teacher), "--quantize", "int8"])
    assert result.exit_code == 0, result.output
    report = json.loads((teacher / "compressed" / "torch-int8.json").read_text())
    assert report["size_int8"] < report["size_fp32"]
    assert (
        set(report["test_int8"])
        == set(report["test_fp32"])
        == {"exam_score", "passed", "grade", "stressed"}
    )
    neither = CliRunner().invoke(app, ["compress", str(teacher)])
    assert neither.exit_code == 1 and "--prune" in neither.output
