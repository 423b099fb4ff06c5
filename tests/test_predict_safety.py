"""``polytask predict`` never destroys a file it was not asked to write, carries ID columns, and
says in one line what is wrong with its input or output."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from cli_checks import one_error_line as _one_error_line
from polytask.cli import app

runner = CliRunner()
FEATURES = [f"x{i}" for i in range(16)]


def run(*args: object) -> Any:
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One trained tiny run, shared by the tests of this module (they only read it)."""
    from conftest import TINY

    root = tmp_path_factory.mktemp("predict")
    raw = {**TINY, "output_dir": str(root / "runs"), "train": {**TINY["train"], "epochs": 1}}
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump(raw))
    result = run("train", config)
    assert result.exit_code == 0, result.output
    return root / "runs" / "tiny"


@pytest.fixture
def rows(tmp_path: Path) -> Path:
    path = tmp_path / "rows.csv"
    frame = pd.DataFrame({name: [0.1 * i, -0.2 * i, 0.3] for i, name in enumerate(FEATURES)})
    frame.insert(0, "user", ["u1", "u2", "u3"])
    frame["order"] = [30, 10, 20]
    frame.to_csv(path, index=False)
    return path


def test_the_output_cannot_be_the_input(run_dir: Path, rows: Path, tmp_path: Path) -> None:
    before = rows.read_bytes()
    line = _one_error_line(run("predict", run_dir, rows, "-o", rows, "--overwrite"))
    assert str(rows) in line and "input" in line
    alias = tmp_path / "sub" / ".." / rows.name  # the same file by another path
    (tmp_path / "sub").mkdir()
    _one_error_line(run("predict", run_dir, rows, "-o", alias, "--overwrite"))
    link = tmp_path / "link.csv"
    link.symlink_to(rows)
    _one_error_line(run("predict", run_dir, rows, "-o", link, "--overwrite"))
    assert rows.read_bytes() == before


def test_an_existing_file_is_kept_without_overwrite(run_dir: Path, rows: Path, tmp_path: Path):
    out = tmp_path / "out.csv"
    out.write_text("precious\n")
    line = _one_error_line(run("predict", run_dir, rows, "-o", out))
    assert str(out) in line and "--overwrite" in line
    assert out.read_text() == "precious\n"
    replaced = run("predict", run_dir, rows, "-o", out, "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    assert list(pd.read_csv(out).columns) == ["t1", "t2"]


def test_keep_carries_id_columns_in_order(run_dir: Path, rows: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.parquet"
    result = run("predict", run_dir, rows, "-o", out, "--keep", "order, user")
    assert result.exit_code == 0, result.output
    frame = pd.read_parquet(out)
    assert list(frame.columns) == ["order", "user", "t1", "t2"]
    assert frame["user"].tolist() == ["u1", "u2", "u3"]
    assert frame["order"].tolist() == [30, 10, 20]


def test_keep_names_a_missing_column(run_dir: Path, rows: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.csv"
    line = _one_error_line(run("predict", run_dir, rows, "-o", out, "--keep", "user,session"))
    assert "'session'" in line and str(rows) in line and "user" in line
    assert not out.exists()


def test_keep_cannot_hide_a_prediction_column(run_dir: Path, rows: Path, tmp_path: Path) -> None:
    frame = pd.read_csv(rows)
    frame["t1"] = 0
    frame.to_csv(rows, index=False)
    line = _one_error_line(run("predict", run_dir, rows, "-o", tmp_path / "o.csv", "--keep", "t1"))
    assert "'t1'" in line


def test_a_header_only_input_is_one_line(run_dir: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty.csv"
    empty.write_text(",".join(FEATURES) + "\n")
    out = tmp_path / "out.csv"
    line = _one_error_line(run("predict", run_dir, empty, "-o", out))
    assert str(empty) in line and "no rows" in line
    assert not out.exists()


def test_an_output_that_is_a_folder_is_one_line(run_dir: Path, rows: Path, tmp_path: Path) -> None:
    folder = tmp_path / "preds.csv"
    folder.mkdir()
    line = _one_error_line(run("predict", run_dir, rows, "-o", folder, "--overwrite"))
    assert str(folder) in line and "folder" in line
    assert folder.is_dir()


@pytest.mark.parametrize("where", ["under-a-file", "read-only"])
def test_an_unwritable_output_is_one_line_naming_it(
    run_dir: Path, rows: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    if where == "under-a-file":
        blocker = tmp_path / "a-file"
        blocker.write_text("x")
        out = blocker / "preds.csv"
    else:
        import polytask.data.files

        def refuse(*args: Any, **kwargs: Any) -> Any:  # as a read-only folder does, even for root
            raise PermissionError(13, "Permission denied", str(tmp_path / ".preds.csv.tmp"))

        monkeypatch.setattr(polytask.data.files.tempfile, "mkstemp", refuse)
        out = tmp_path / "preds.csv"
    line = _one_error_line(run("predict", run_dir, rows, "-o", out))
    assert line.startswith(f"error: {out}: cannot write")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
