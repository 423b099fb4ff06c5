"""`polytask compare CONFIG --methods a,b --seeds N`: methods over seeds against baselines."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from typer.testing import CliRunner

from polytask.cli import app


def test_compare_methods_over_seeds(tiny_yaml: Path, tmp_path: Path) -> None:
    md, table, png = tmp_path / "cmp.md", tmp_path / "cmp.csv", tmp_path / "cmp.png"
    result = CliRunner().invoke(
        app,
        [
            "compare",
            str(tiny_yaml),
            "--methods",
            "equal,mgda",
            "--seeds",
            "2",
            "--output-dir",
            str(tmp_path / "runs"),
            "--markdown",
            str(md),
            "--csv",
            str(table),
            "--plot",
            str(png),
        ],
    )
    assert result.exit_code == 0, result.output
    text = md.read_text()
    assert "| method | t1 rmse | t2 rmse | Δm% |" in text
    assert "| single-task |" in text and text.count("±") >= 6
    rows = pd.read_csv(table)
    assert set(rows["method"]) == {"equal", "mgda"} and set(rows["seed"]) == {0, 1}
    assert png.read_bytes()[:4] == b"\x89PNG"
    # rows are sorted by Δm%, best first
    deltas = rows.groupby("method")["delta_m"].mean().sort_values(ascending=False)
    body = [
        line
        for line in text.splitlines()
        if line.startswith("| equal") or line.startswith("| mgda")
    ]
    assert [line.split("|")[1].strip() for line in body] == list(deltas.index)
    # the baselines were trained once for the comparison, not once per method
    assert (tmp_path / "runs" / "compare-tiny" / "baselines" / "t1").is_dir()


def test_compare_bad_method_is_one_line(tiny_yaml: Path) -> None:
    result = CliRunner().invoke(app, ["compare", str(tiny_yaml), "--methods", "equal,magic"])
    assert result.exit_code == 1 and "unknown balancing method(s) magic" in result.output
