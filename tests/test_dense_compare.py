"""``polytask compare`` on dense tasks: single-task baselines per dense task and Δm% over all
nine metrics, each signed by its direction, checked by hand against the per-run results; and the
documented NYUv2 command run on a small folder in the MTAN/LibMTL layout."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from polytask.cli import app
from polytask.evaluate.compare import relative_gains
from polytask.tasks import TaskSpec
from test_dense import NYU, _write_npy_folder

runner = CliRunner()

#: each dense metric's direction, written out here (not read from polytask) so that a wrong
#: direction in the library fails the test
HIGHER_IS_BETTER = {
    "miou": True,
    "pixel_accuracy": True,
    "abs_err": False,
    "rel_err": False,
    "mean_angle": False,
    "median_angle": False,
    "within_11_25": True,
    "within_22_5": True,
    "within_30": True,
}
TASK_METRICS = {
    "segment": ["miou", "pixel_accuracy"],
    "depth": ["abs_err", "rel_err"],
    "normal": ["mean_angle", "median_angle", "within_11_25", "within_22_5", "within_30"],
}
TASKS = [
    TaskSpec("segment", "segmentation", num_classes=4),
    TaskSpec("depth", "depth"),
    TaskSpec("normal", "normals", num_classes=3),
]


def _tiny_dense(tmp_path: Path, data: dict[str, Any]) -> Path:
    raw = {
        "name": "dense-tiny",
        "seed": 0,
        "data": data,
        "model": {
            "encoder": "dense_cnn",
            "encoder_params": {"channels": [4, 4, 4], "dilations": [1, 2], "out_features": 4},
            "head": "dense",
            "head_params": {"hidden": 4},
            "architecture": "hard_sharing",
        },
        "optimizer": {"name": "adamw", "lr": 0.01},
        "train": {"epochs": 1, "progress": False},
    }
    path = tmp_path / "dense.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _delta_by_hand(run: dict[str, dict[str, float]], base: dict[str, dict[str, float]]) -> float:
    gains = []
    for task, metrics in TASK_METRICS.items():
        for metric in metrics:
            m, b = run[task][metric], base[task][metric]
            if b == 0 or m is None or b is None:
                continue  # no relative change from a zero baseline
            sign = 1.0 if HIGHER_IS_BETTER[metric] else -1.0
            gains.append(100.0 * sign * (m - b) / abs(b))
    return sum(gains) / len(gains)


def test_compare_on_dense_shapes_delta_m_by_hand(tmp_path: Path) -> None:
    config = _tiny_dense(
        tmp_path,
        {"dataset": "dense-shapes", "params": {"num_samples": 80, "size": 16}, "batch_size": 16},
    )
    out = tmp_path / "out"
    args = ["compare", str(config), "--methods", "equal,uncertainty", "--seeds", "1"]
    args += ["--output-dir", str(tmp_path / "runs"), "--markdown", str(out / "table.md")]
    args += ["--csv", str(out / "table.csv"), "--plot", str(out / "delta.png")]
    result = runner.invoke(app, [*args, "--report", str(out / "report.html")])
    assert result.exit_code == 0, result.output
    folder = tmp_path / "runs" / "compare-dense-tiny"
    # one single-task baseline per dense task, each trained on its task alone
    baselines = {}
    for task in TASK_METRICS:
        saved = json.loads((folder / "baselines" / task / "results.json").read_text())
        assert list(saved["test"]) == [task]
        baselines[task] = saved["test"][task]
    rows = list(csv.DictReader((out / "table.csv").open()))
    deltas = {}
    for method in ("equal", "uncertainty"):
        test = json.loads((folder / f"{method}-seed0" / "results.json").read_text())["test"]
        expected = _delta_by_hand(test, baselines)
        mine = [r for r in rows if r["method"] == method]
        (written_delta,) = {float(r["delta_m"]) for r in mine}
        assert written_delta == pytest.approx(expected, abs=1e-9)
        written = {(r["task"], r["metric"]): float(r["value"]) for r in mine}
        for task, metrics in TASK_METRICS.items():
            for metric in metrics:
                assert written[task, metric] == pytest.approx(test[task][metric])
        deltas[method] = expected
        # signs, metric by metric: a lower error or angle than the baseline's is a gain, a
        # lower mIoU, accuracy or within-X° share a loss
        for task, gains in relative_gains(test, baselines, TASKS).items():
            for metric, gain in gains.items():
                change = test[task][metric] - baselines[task][metric]
                direction = 1 if HIGHER_IS_BETTER[metric] else -1
                assert np.sign(gain) == np.sign(change) * direction, (task, metric)
    # the Markdown table: every dense metric is a column, Δm% per method, best first
    table = (out / "table.md").read_text()
    header = next(line for line in table.splitlines() if line.startswith("| method"))
    for task, metrics in TASK_METRICS.items():
        for metric in metrics:
            assert f"{task} {metric}" in header
    order = sorted(deltas, key=lambda m: -deltas[m])
    lines = [line for line in table.splitlines() if line.startswith(("| equal", "| uncertainty"))]
    assert [line.split("|")[1].strip() for line in lines] == order
    for line in lines:
        method = line.split("|")[1].strip()
        assert line.rstrip(" |").endswith(f"{deltas[method]:.2f} ± 0.00")
    assert (out / "delta.png").read_bytes()[:4] == b"\x89PNG"
    assert "Δm%" in (out / "report.html").read_text()


def test_documented_nyuv2_compare_on_a_small_folder(tmp_path: Path) -> None:
    """The command of docs/dense.md on 6 + 2 generated scenes in the 288×384 ``.npy`` layout,
    read by the real ``nyuv2`` loader (``check_counts: false``), with a tiny encoder."""
    data_dir = tmp_path / "nyuv2"
    _write_npy_folder(data_dir, NYU, {"train": 6, "val": 2})
    params = {"path": str(data_dir), "check_counts": False, "val_fraction": 0.2}
    config = _tiny_dense(tmp_path, {"dataset": "nyuv2", "params": params, "batch_size": 4})
    markdown = tmp_path / "nyuv2.md"
    result = runner.invoke(
        app,
        [
            "compare",
            str(config),
            "--methods",
            "equal,dwa",
            "--seeds",
            "1",
            "--markdown",
            str(markdown),
            "--output-dir",
            str(tmp_path / "runs"),
        ],
    )
    assert result.exit_code == 0, result.output
    folder = tmp_path / "runs" / "compare-dense-tiny"
    assert sorted(p.name for p in (folder / "baselines").iterdir()) == [
        "depth",
        "normal",
        "segment",
    ]
    test = json.loads((folder / "equal-seed0" / "results.json").read_text())["test"]
    assert 0 <= test["segment"]["miou"] <= 1
    assert np.isfinite(test["normal"]["mean_angle"]) and test["depth"]["abs_err"] > 0
    text = markdown.read_text()
    assert "segment miou" in text and "normal within_30" in text and "| single-task |" in text
