"""``polytask report``: one self-contained HTML page about a run, and about a comparison."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import html5lib
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from typer.testing import CliRunner

from polytask.analysis.html import slug
from polytask.analysis.report import (
    SECTIONS,
    calibration_bins,
    diagnostics_series,
    gate_usage,
)
from polytask.cli import app
from polytask.config import parse_config
from polytask.models import build_model
from polytask.run.experiments import train_with_baselines
from polytask.tasks import TaskSpec

runner = CliRunner()
XHTML = "{http://www.w3.org/1999/xhtml}"


def _mixed_csv(path: Path) -> Path:
    """A table with a multiclass, a binary (some labels missing) and a regression task."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 5))
    frame = pd.DataFrame(x, columns=[f"x{i}" for i in range(5)])
    frame["kind"] = np.digitize(x[:, 0] + 0.3 * x[:, 1], [-0.5, 0.5]).astype(float)
    frame["flag"] = (x[:, 2] + 0.5 * x[:, 0] > 0).astype(float)
    frame.loc[rng.random(300) < 0.2, "flag"] = np.nan
    frame["size"] = 2 * x[:, 3] + x[:, 0] + 0.1 * rng.normal(size=300)
    frame.to_csv(path, index=False)
    return path


def _mixed_raw(tmp_path: Path, **model: Any) -> dict[str, Any]:
    tasks = [
        {"name": "kind", "kind": "multiclass", "num_classes": 3},
        {"name": "flag", "kind": "binary"},
        {"name": "size", "kind": "regression"},
    ]
    return {
        "name": "mixed",
        "seed": 0,
        "output_dir": str(tmp_path / "runs"),
        "data": {
            "dataset": "file",
            "params": {"path": str(_mixed_csv(tmp_path / "mixed.csv")), "tasks": tasks},
            "batch_size": 64,
        },
        "model": {"encoder": "mlp", "encoder_params": {"hidden": [8]}, **model},
        "balancing": {"method": "uncertainty"},
        "optimizer": {"name": "adamw", "lr": 0.01},
        "train": {"epochs": 1, "progress": False},
    }


def _add_diagnostics(run_dir: Path, tasks: list[str]) -> None:
    """Give every epoch record a ``diagnostics`` entry in the trainer's format (a task absent
    at one step is null there)."""
    path = run_dir / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rng = np.random.default_rng(1)
    k = len(tasks)
    for record in records:
        steps = [record["step"] - 4, record["step"] - 2, record["step"]]
        cosine, norms, inner = [], [], []
        for _ in steps:
            g = rng.normal(size=(k, 6))
            unit = g / np.linalg.norm(g, axis=1, keepdims=True)
            cosine.append((unit @ unit.T).tolist())
            norms.append(np.linalg.norm(g, axis=1).tolist())
            inner.append((g @ g.mean(axis=0)).tolist())
        cosine[0][1] = [None] * k  # task 1 absent at the first step
        for row in cosine[0]:
            row[1] = None
        norms[0][1] = inner[0][1] = None
        record["diagnostics"] = {
            "tasks": tasks,
            "steps": steps,
            "cosine": cosine,
            "norms": norms,
            "update_inner": inner,
        }
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def _sections(page: str) -> dict[str, Any]:
    document = html5lib.parse(page, namespaceHTMLElements=True)
    return {s.get("id"): s for s in document.iter(f"{XHTML}section")}


def test_report_of_an_mmoe_run_holds_every_section_and_no_url(tmp_path: Path) -> None:
    config = parse_config(
        _mixed_raw(tmp_path, architecture="mmoe", architecture_params={"num_experts": 3}),
        source="test",
    )
    result = train_with_baselines(config, baselines=True)
    _add_diagnostics(result.run_dir, ["kind", "flag", "size"])
    output = tmp_path / "out" / "report.html"
    cli = runner.invoke(app, ["report", str(result.run_dir), "--output", str(output)])
    assert cli.exit_code == 0, cli.output
    page = output.read_text()
    html5lib.HTMLParser(strict=True).parse(page)  # well-formed HTML5, not merely tolerated
    sections = _sections(page)
    assert list(sections) == [slug(title) for title in SECTIONS]
    for sid, element in sections.items():
        text = "".join(element.itertext())
        assert "no data" not in text, sid
    assert re.search(r"https?://", page) is None
    for element in html5lib.parse(page, namespaceHTMLElements=True).iter(f"{XHTML}img"):
        assert element.get("src").startswith("data:image/png;base64,")
    test_text = "".join(sections["test-results"].itertext())
    assert "Δm%" in test_text and "single-task" in test_text
    assert "uphill" in "".join(sections["gradient-cosine"].itertext()) or "No task" in "".join(
        sections["gradient-cosine"].itertext()
    )
    data_text = "".join(sections["data"].itertext())
    assert "flag" in data_text and "%" in data_text


def test_report_leaves_out_what_a_run_does_not_have(tmp_path: Path, tiny_raw: dict) -> None:
    tiny_raw["train"]["epochs"] = 1
    result = train_with_baselines(parse_config(tiny_raw, source="tiny"), baselines=False)
    cli = runner.invoke(app, ["report", str(result.run_dir)])
    assert cli.exit_code == 0, cli.output
    sections = _sections((result.run_dir / "report.html").read_text())
    for absent in ("gate-usage", "confusion-matrices", "calibration"):
        assert absent not in sections  # hard sharing, regression tasks only
    assert "No gradient diagnostics" in "".join(sections["gradient-cosine"].itertext())
    assert "No single-task baselines" in "".join(sections["test-results"].itertext())
    assert "residuals" in sections


def test_report_of_a_folder_that_is_not_a_run_is_one_error_line(tmp_path: Path) -> None:
    cli = runner.invoke(app, ["report", str(tmp_path)])
    assert cli.exit_code == 1
    assert "no checkpoints/best.safetensors" in cli.output


def test_gate_usage_hooks_every_gate_and_averages_its_weights() -> None:
    tasks = [TaskSpec("a", "regression"), TaskSpec("b", "binary")]
    model = build_model(
        tasks,
        (4,),
        encoder_params={"hidden": [6]},
        architecture="ple",
        architecture_params={"num_levels": 2, "shared_experts": 2},
    )
    x = torch.randn(10, 4)
    usage = gate_usage(model, lambda: model(x))
    out = model(x)
    assert set(usage) == {
        "levels.0.task_gates.a",
        "levels.0.task_gates.b",
        "levels.0.shared_gate",
        "levels.1.task_gates.a",
        "levels.1.task_gates.b",
    }
    expected = out.extras["gates"]["a"].detach().double().mean(dim=0).numpy()
    assert np.allclose(usage["levels.1.task_gates.a"], expected)
    assert all(abs(v.sum() - 1) < 1e-6 for v in usage.values())
    assert not model._forward_hooks and all(not m._forward_hooks for m in model.modules())


def test_calibration_bins_and_diagnostics_nulls() -> None:
    p = torch.tensor([0.05, 0.15, 0.95, 0.85, 0.55])
    y = torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0])
    _, observed, count, ece = calibration_bins(p, y, bins=10)
    assert count.tolist() == [1, 1, 1, 1, 1] and observed.tolist() == [0, 1, 0, 1, 1]
    assert ece == pytest.approx((0.05 + 0.85 + 0.55 + 0.15 + 0.05) / 5)
    record = {
        "diagnostics": {
            "tasks": ["a", "b"],
            "steps": [5],
            "cosine": [[[1.0, None], [None, None]]],
            "norms": [[2.0, None]],
            "update_inner": [[-1.0, None]],
        }
    }
    tasks, steps, cosine, norms, inner = diagnostics_series([{"epoch": 1}, record])
    assert tasks == ["a", "b"] and steps == [5.0]
    assert cosine.shape == (1, 2, 2) and np.isnan(cosine[0, 0, 1]) and cosine[0, 0, 0] == 1
    assert norms[0, 0] == 2 and np.isnan(inner[0, 1])


def test_compare_writes_a_report_with_error_bars_over_seeds(tmp_path: Path, tiny_raw: dict) -> None:
    tiny_raw["train"]["epochs"] = 1
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_raw))
    path = tmp_path / "compare.html"
    args = ["--methods", "equal,uncertainty", "--seeds", "2", "--output-dir", str(tmp_path / "c")]
    cli = runner.invoke(app, ["compare", str(config), *args, "--report", str(path)])
    assert cli.exit_code == 0, cli.output
    page = path.read_text()
    html5lib.HTMLParser(strict=True).parse(page)
    sections = _sections(page)
    assert list(sections) == ["methods", "multi-task-gain", "test-metrics", "validation-curves"]
    methods = "".join(sections["methods"].itertext())
    assert "equal" in methods and "uncertainty" in methods and "±" in methods
    assert "single-task" in methods
    for sid in ("multi-task-gain", "test-metrics", "validation-curves"):
        images = list(sections[sid].iter(f"{XHTML}img"))
        assert len(images) == 1, sid  # drawn from the runs' results and metrics logs
    assert re.search(r"https?://", page) is None
