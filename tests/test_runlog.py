"""Run log: metrics.jsonl round trips, truncation on resume, curve plots."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from polytask.errors import CheckpointError
from polytask.train.runlog import MetricsLog, plot_curves, read_metrics, truncate_after

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _record(epoch: int, tasks: list[str], *, val: bool = True) -> dict[str, Any]:
    record: dict[str, Any] = {
        "epoch": epoch,
        "step": 10 * epoch,
        "lr": 0.001,
        "time_s": 3.2,
        "train": {t: {"loss": 1.0 / epoch + i, "absent_steps": 0} for i, t in enumerate(tasks)},
        "weights": {t: 1.0 + 0.1 * i * epoch for i, t in enumerate(tasks)},
    }
    if val:
        record["val"] = {
            t: {"accuracy": 0.5 + 0.05 * epoch, "macro_f1": 0.4 + 0.05 * epoch, "loss": 0.9}
            for t in tasks
        }
    return record


def test_jsonl_round_trip_writes_nan_as_null(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path / "run")
    assert log.path == tmp_path / "run" / "metrics.jsonl" and log.path.exists()
    assert read_metrics(log.path) == []

    log.append({"epoch": 1, "val": {"a": {"loss": math.nan, "f1": math.inf}}, "t": (1, 2)})
    log.append({"epoch": 2, "lr": np.float32(0.5), "steps": np.int64(7), "x": -math.inf})
    lines = log.path.read_text().splitlines()
    assert len(lines) == 2
    for line in lines:
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert read_metrics(log.path) == [
        {"epoch": 1, "val": {"a": {"loss": None, "f1": None}}, "t": [1, 2]},
        {"epoch": 2, "lr": 0.5, "steps": 7, "x": None},
    ]
    assert read_metrics(tmp_path / "run") == log.read()  # a run folder works too
    assert MetricsLog(log.path).path == log.path  # so does the file itself


def test_torn_last_line_is_skipped_and_not_glued_to_the_next(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path)
    log.append({"epoch": 1})
    with open(log.path, "a") as file:
        file.write('{"epoch": 2, "tra')  # crash mid-line
    with pytest.warns(RuntimeWarning, match="metrics.jsonl:2"):
        assert read_metrics(log.path) == [{"epoch": 1}]
    log.append({"epoch": 2})
    with pytest.warns(RuntimeWarning):
        assert read_metrics(log.path) == [{"epoch": 1}, {"epoch": 2}]


def test_truncate_after_keeps_epochs_up_to_the_checkpoint(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path)
    for epoch in range(1, 6):
        log.append({"epoch": epoch, "loss": float(epoch)})
    log.append({"summary": True})  # no epoch: dropped as well

    truncate_after(log.path, 3)
    assert [r["epoch"] for r in read_metrics(log.path)] == [1, 2, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]  # no tmp file

    log.append({"epoch": 4, "loss": 0.5})  # the same MetricsLog keeps working after it
    assert [r["epoch"] for r in read_metrics(log.path)] == [1, 2, 3, 4]
    truncate_after(tmp_path, 0)
    assert read_metrics(log.path) == []
    truncate_after(tmp_path / "nothing.jsonl", 2)  # missing file: nothing to do
    assert not (tmp_path / "nothing.jsonl").exists()


def test_missing_log_is_a_checkpoint_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="metrics log not found"):
        read_metrics(tmp_path / "metrics.jsonl")


@pytest.mark.parametrize("n_tasks", [1, 4])
def test_plot_curves_writes_a_png(tmp_path: Path, n_tasks: int) -> None:
    tasks = ["left", "right", "up", "down"][:n_tasks]
    records = [_record(epoch, tasks, val=epoch % 2 == 1) for epoch in range(1, 5)]
    records[1]["train"][tasks[0]]["loss"] = None  # nulls and missing entries are skipped
    records[2]["val"][tasks[-1]]["macro_f1"] = math.nan
    del records[3]["weights"]
    path = tmp_path / "curves.png"
    plot_curves(records, path, title=f"{n_tasks} tasks")
    assert path.read_bytes().startswith(PNG_MAGIC)
    assert [p.name for p in tmp_path.iterdir()] == ["curves.png"]


def test_plot_curves_of_40_tasks_lays_out_without_a_warning(tmp_path: Path) -> None:
    """CelebA's 40 attributes: the weights panel's 40 lines get no legend (it would not fit,
    and matplotlib warned that the layout failed)."""
    tasks = [f"attribute_{i}" for i in range(40)]
    records = [_record(epoch, tasks, val=True) for epoch in range(1, 3)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plot_curves(records, tmp_path / "curves.png", title="40 tasks")
    assert (tmp_path / "curves.png").read_bytes().startswith(PNG_MAGIC)


def test_plot_curves_tolerates_sparse_records(tmp_path: Path) -> None:
    records: list[dict[str, Any]] = [
        {"epoch": 1, "train": {"a": {"loss": 0.7}}},  # no val, no weights
        {"epoch": 2, "train": {"a": {}}, "val": None, "weights": None},
        {"train": {"a": {"loss": 0.1}}},  # no epoch: skipped
        {"epoch": 3, "train": {"a": {"loss": "oops"}}, "val": {"a": {"accuracy": None}}},
    ]
    for name, recs in [("sparse.png", records), ("empty.png", []), ("one.png", records[:1])]:
        plot_curves(recs, tmp_path / name)
        assert (tmp_path / name).read_bytes().startswith(PNG_MAGIC)


def test_plot_shows_samples_seen_per_task(tmp_path: Path) -> None:
    records = [
        {"epoch": e, "train": {"a": {"loss": 1.0 / e}}, "seen": {"a": 100 * e, "b": 3 * e}}
        for e in (1, 2, 3)
    ]
    from polytask.train.runlog import _collect, plot_curves

    *_, seen = _collect(records)
    assert seen.points
    plot_curves(records, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"


# --------------------------------------------------------------------------- a kill at any moment


def _trainer_state(epoch: int, best_epoch: int) -> dict[str, Any]:
    """The parts of a Trainer's state the run log's checkpoints are judged by."""
    import torch

    return {
        "epoch": epoch,
        "early_stopping": {"best": -float(best_epoch), "best_epoch": best_epoch, "bad_epochs": 0},
        "model": {"w": torch.full((3,), float(epoch))},
    }


# epoch -> improved: epochs 1 and 2 improve, 3 does not, 4 does
_IMPROVED = {1: True, 2: True, 3: False, 4: True}


def _run_epochs(run_dir: Path, epochs: range, best_epoch: int) -> int:
    from polytask.train.runlog import RunLog

    log = RunLog(run_dir)
    log.start(resumed_at=epochs.start - 1 if epochs.start > 1 else None)
    for epoch in epochs:
        best_epoch = epoch if _IMPROVED[epoch] else best_epoch
        state = _trainer_state(epoch, best_epoch)
        log.epoch({"epoch": epoch}, lambda state=state: state, best=_IMPROVED[epoch])
    return best_epoch


def _killed_at(replace_call: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the ``replace_call``-th atomic rename (every checkpoint write ends with one) the
    moment the process dies."""
    import os

    import polytask.io

    calls = {"n": 0}
    real = os.replace

    def replace(source: Any, target: Any) -> None:
        calls["n"] += 1
        if calls["n"] == replace_call:
            raise KeyboardInterrupt
        real(source, target)

    monkeypatch.setattr(polytask.io.os, "replace", replace)


@pytest.mark.parametrize("kill_at", range(1, 8))
def test_best_matches_last_after_a_kill_at_any_checkpoint_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kill_at: int
) -> None:
    from polytask.train.checkpoint import load_checkpoint, read_checkpoint_metadata

    run_dir = tmp_path / "run"
    _killed_at(kill_at, monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        _run_epochs(run_dir, range(1, 5), 0)
    monkeypatch.undo()

    checkpoints = run_dir / "checkpoints"
    last = checkpoints / "last.safetensors"
    if not last.exists():  # killed before the first checkpoint: nothing to resume
        return
    resumed_at = read_checkpoint_metadata(last)["epoch"]
    _run_epochs(run_dir, range(resumed_at + 1, resumed_at + 1), 0)  # resume, run nothing
    recorded = read_checkpoint_metadata(last)["early_stopping"]["best_epoch"]
    best = load_checkpoint(checkpoints / "best.safetensors")
    assert best["epoch"] == recorded, "best.safetensors is not the epoch last records as best"
    assert best["model"]["w"][0].item() == recorded


def test_resuming_removes_the_temporary_files_a_kill_left(tmp_path: Path) -> None:
    """A process killed inside ``atomic_path`` (SIGKILL, power loss) leaves its temporary file;
    the run that resumes in the folder removes them, and nothing else."""
    run_dir = tmp_path / "run"
    _run_epochs(run_dir, range(1, 3), 0)
    checkpoints = run_dir / "checkpoints"
    left = [
        checkpoints / ".last.safetensors.k2j4x_9a.tmp.safetensors",
        checkpoints / ".best.safetensors.0abcdefg.tmp.safetensors",
        run_dir / ".metrics.jsonl.a1b2c3d4.tmp.jsonl",
        run_dir / ".curves.png.zz99yy88.tmp.png",
        run_dir / ".results.json.q8w7e6r5.tmp",  # written by data.files.write_frame's scheme
    ]
    kept = [run_dir / ".lock", run_dir / "notes.tmp", run_dir / ".hidden", checkpoints / "x.tmp"]
    for path in [*left, *kept]:
        path.write_bytes(b"partial")

    _run_epochs(run_dir, range(3, 3), 0)  # resume after epoch 2
    assert [p for p in left if p.exists()] == []
    assert all(p.exists() for p in kept)
