"""Checkpoints seen from the command line: a full disk while training and a corrupted file are
one line each, and the run folder stays usable."""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import polytask.train.checkpoint
from cli_checks import one_error_line as _one_error_line
from polytask.cli import app
from polytask.train.checkpoint import load_checkpoint

runner = CliRunner()


def run(*args: object) -> Any:
    return runner.invoke(app, [str(a) for a in args])


def test_a_full_disk_while_training_is_one_line_and_the_run_resumes(
    tiny_yaml: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = polytask.train.checkpoint.write_bytes_atomic
    writes = {"n": 0}

    def disk_fills_up(path: Any, data: bytes) -> None:
        writes["n"] += 1
        if writes["n"] > 2:  # epoch 1 wrote last and best; epoch 2's last finds the disk full
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data)

    monkeypatch.setattr(polytask.train.checkpoint, "write_bytes_atomic", disk_fills_up)
    line = _one_error_line(run("train", tiny_yaml, "train.epochs=3"))
    monkeypatch.undo()
    run_dir = tmp_path / "runs" / "tiny"
    last = run_dir / "checkpoints" / "last.safetensors"
    assert f"{last}: cannot write checkpoint (No space left on device)" in line
    assert load_checkpoint(last)["epoch"] == 1  # the previous checkpoint survived
    resumed = run("train", "--resume", run_dir)
    assert resumed.exit_code == 0, resumed.output
    assert load_checkpoint(last)["epoch"] == 3


@pytest.mark.parametrize("command", ["evaluate", "predict"])
def test_a_corrupted_checkpoint_is_refused_naming_it(
    tiny_yaml: Path, tmp_path: Path, command: str
) -> None:
    assert run("train", tiny_yaml, "train.epochs=1").exit_code == 0
    run_dir = tmp_path / "runs" / "tiny"
    best = run_dir / "checkpoints" / "best.safetensors"
    data = bytearray(best.read_bytes())
    data[-3] ^= 0x01  # one bit of a weight
    best.write_bytes(bytes(data))
    rows = tmp_path / "rows.csv"
    rows.write_text(",".join(f"x{i}" for i in range(16)) + "\n" + ",".join(["0"] * 16) + "\n")
    args = [run_dir] if command == "evaluate" else [run_dir, rows, "-o", tmp_path / "p.csv"]
    line = _one_error_line(run(command, *args))
    assert str(best) in line and "checksum" in line
    assert not (tmp_path / "p.csv").exists()
