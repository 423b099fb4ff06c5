"""Dense models served: a tiny dense-shapes run exported to ONNX must give ``predict_arrays``'
per-pixel predictions (class map and probabilities, depth in the labels' units, unit normals)
within 1e-5, and ``/predict`` returns the maps, on the torch and the ONNX engine."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from polytask.cli import app
from polytask.config import parse_config
from polytask.dense_tasks import DENSE_KINDS
from polytask.evaluate.inference import decoded_predictions
from polytask.run.data import dataset_entries, dataset_tables
from polytask.run.folder import TrainedModel, load_trained
from polytask.run.single import train_run
from polytask.serve import onnx_runtime
from polytask.serve.app import ServeSettings, create_app
from polytask.serve.export import export_onnx, request_columns, table_rows
from polytask.serve.onnx_runtime import OnnxPredictor
from polytask.serve.predict import predict_arrays

TOLERANCE = 1e-5
SIZE = 16


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """A dense-shapes run of 16×16 scenes (one epoch, a few seconds) and its raw table."""
    tmp = tmp_path_factory.mktemp("dense-serve")
    config = parse_config(
        {
            "name": "dense-serve",
            "seed": 0,
            "output_dir": str(tmp),
            "data": {
                "dataset": "dense-shapes",
                "params": {"num_samples": 60, "size": SIZE},
                "batch_size": 20,
            },
            "model": {
                "encoder": "dense_cnn",
                "encoder_params": {"channels": [4, 4, 4], "out_features": 4},
                "head": "dense",
                "head_params": {"hidden": 4},
            },
            "optimizer": {"name": "adamw", "lr": 0.01},
            "train": {"epochs": 1, "progress": False},
        }
    )
    run = train_run(config)
    tables, _ = dataset_tables(dataset_entries(config), seed=config.seed)
    return run.run_dir, tables[0][1]


@pytest.fixture(scope="module")
def exported(dense_run: tuple[Path, Any]) -> tuple[TrainedModel, OnnxPredictor]:
    run_dir, _ = dense_run
    result = export_onnx(run_dir)
    return load_trained(run_dir), OnnxPredictor(result.model_path)


def test_onnx_matches_predict_arrays_per_pixel(
    dense_run: tuple[Path, Any], exported: tuple[TrainedModel, OnnxPredictor]
) -> None:
    _, table = dense_run
    trained, predictor = exported
    raw = table_rows(table.inputs, np.arange(12))
    inputs = trained.preprocess(raw)
    columns = request_columns(trained, raw)
    expected = predict_arrays(trained.model, trained.tasks, inputs)
    found = predictor.predict(columns)
    assert list(found) == ["segment", "depth", "normal"] == list(expected)
    assert expected["segment"].shape == (12, SIZE, SIZE) and expected["segment"].dtype == np.int64
    assert expected["depth"].shape == (12, SIZE, SIZE)
    assert expected["normal"].shape == (12, 3, SIZE, SIZE)
    for name in ("depth", "normal"):
        np.testing.assert_allclose(found[name], expected[name], rtol=TOLERANCE, atol=TOLERANCE)
    np.testing.assert_allclose(np.linalg.norm(found["normal"], axis=1), 1.0, atol=1e-5)
    # class probabilities per pixel, and the class map the graph takes from them
    decoded = decoded_predictions(trained.model, inputs, trained.tasks)
    probabilities = predictor.probabilities(columns)
    assert list(probabilities) == ["segment"]
    want = decoded["segment"].numpy()
    assert probabilities["segment"].shape == (12, 4, SIZE, SIZE)
    np.testing.assert_allclose(probabilities["segment"], want, rtol=TOLERANCE, atol=TOLERANCE)
    top2 = np.sort(want, axis=1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > TOLERANCE  # pixels without a near tie
    assert clear.mean() > 0.99
    np.testing.assert_array_equal(found["segment"][clear], expected["segment"][clear])
    assert (found["segment"] == want.argmax(axis=1))[clear].all()


def test_depth_is_predicted_in_the_labels_units(
    dense_run: tuple[Path, Any], exported: tuple[TrainedModel, OnnxPredictor]
) -> None:
    """The head predicts standardised depth; the graph and ``predict_arrays`` give metres of the
    labels: the head's raw output times the training depths' std plus their mean."""
    _, table = dense_run
    trained, predictor = exported
    (depth_task,) = [t for t in trained.tasks if t.kind == "depth"]
    assert depth_task.target_mean is not None and depth_task.target_std is not None
    labels = table.targets["depth"][:, 0]
    valid = labels[labels > 0]
    assert depth_task.target_mean[0] == pytest.approx(valid.mean(), rel=0.05)
    assert depth_task.target_std[0] == pytest.approx(valid.std(), rel=0.2)
    raw = table_rows(table.inputs, np.arange(6))
    inputs = trained.preprocess(raw)
    with torch.no_grad():
        head = trained.model.eval()(torch.as_tensor(inputs)).outputs["depth"][:, 0].numpy()
    scaled = head * depth_task.target_std[0] + depth_task.target_mean[0]
    found = predictor.predict(request_columns(trained, raw))["depth"]
    np.testing.assert_allclose(found, scaled, rtol=TOLERANCE, atol=TOLERANCE)
    assert abs(float(found.mean()) - float(valid.mean())) < 0.5  # metres, not z-scores


def test_runtime_names_the_dense_kinds_as_the_tasks_do() -> None:
    assert onnx_runtime.DENSE_KINDS == DENSE_KINDS


@pytest.mark.parametrize("engine", ["torch", "onnx"])
def test_predict_endpoint_returns_the_maps(
    dense_run: tuple[Path, Any], exported: tuple[TrainedModel, OnnxPredictor], engine: str
) -> None:
    run_dir, table = dense_run
    trained, _ = exported
    raw = table_rows(table.inputs, np.arange(3))
    expected = predict_arrays(trained.model, trained.tasks, trained.preprocess(raw))
    with TestClient(create_app(run_dir, ServeSettings(engine=engine))) as client:
        metadata = client.get("/metadata").json()
        (field,) = metadata["inputs"]  # the image: one flattened tensor field
        assert field["name"] == "inputs"  # the same request body for either engine
        records = [{field["name"]: image.ravel().tolist()} for image in np.asarray(raw)]
        response = client.post("/predict", json=records)
        openapi = client.get("/openapi.json").json()
    assert response.status_code == 200, response.text
    described = json.dumps(openapi)  # the response schema says what each map holds
    assert "the depth of each pixel, [height][width]" in described
    tasks = {t["name"]: t for t in metadata["tasks"]}
    assert tasks["segment"]["columns"] == ["segment"]
    assert tasks["segment"]["classes"] == [0, 1, 2, 3]
    assert tasks["normal"]["columns"] == ["normal"]
    predictions = response.json()["predictions"]
    assert len(predictions) == 3
    segment = np.array([p["segment"] for p in predictions])
    assert segment.shape == (3, SIZE, SIZE)
    assert (segment == expected["segment"]).mean() > 0.99  # near ties may differ (engine)
    for name in ("depth", "normal"):
        got = np.array([p[name] for p in predictions], dtype=np.float32)
        np.testing.assert_allclose(got, expected[name], rtol=TOLERANCE, atol=TOLERANCE)


def test_predict_file_writes_each_map_flattened(
    dense_run: tuple[Path, Any], exported: tuple[TrainedModel, OnnxPredictor], tmp_path: Path
) -> None:
    """``polytask predict`` on a dense run: images in as flattened columns, each task's map out
    as flattened columns ``task_0`` … (row-major), equal to ``predict_arrays``."""
    run_dir, table = dense_run
    trained, _ = exported
    images = np.asarray(table_rows(table.inputs, np.arange(4)))
    pd.DataFrame(images.reshape(4, -1), columns=[f"p{i}" for i in range(3 * SIZE * SIZE)]).to_csv(
        tmp_path / "images.csv", index=False
    )
    result = CliRunner().invoke(
        app,
        ["predict", str(run_dir), str(tmp_path / "images.csv"), "-o", str(tmp_path / "out.csv")],
    )
    assert result.exit_code == 0, result.output
    written = pd.read_csv(tmp_path / "out.csv")
    expected = predict_arrays(trained.model, trained.tasks, trained.preprocess(images))
    assert written.shape == (4, SIZE * SIZE * 5)
    assert list(written.columns[:2]) == ["segment_0", "segment_1"]
    for name, values in expected.items():
        flat = values.reshape(4, -1)
        got = written[[f"{name}_{i}" for i in range(flat.shape[1])]].to_numpy()
        np.testing.assert_allclose(got, flat, rtol=1e-6, atol=1e-6)
