"""Fault injection: a training process killed at random moments (SIGKILL, SIGTERM, SIGINT, some
of them during checkpoint writes) and resumed until it finishes ends with exactly the metrics of
an uninterrupted run; a disk that fills up during a checkpoint write and a corrupted checkpoint
are one clear line each, and nothing already written is lost.

The kill moments are drawn from a seeded generator, so a failure can be replayed.
"""

from __future__ import annotations

import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import TINY

ENV = {**os.environ, "COLUMNS": "200", "PYTHONWARNINGS": "ignore"}


def _config(folder: Path, epochs: int = 4) -> Path:
    raw = json.loads(json.dumps(TINY))
    raw["data"]["params"]["num_samples"] = 4000
    raw["train"]["epochs"] = epochs
    raw["output_dir"] = str(folder / "runs")
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _polytask(*args: str, **kwargs: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "polytask", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=ENV,
        **kwargs,  # type: ignore[call-overload]
    )


def _finish(process: subprocess.Popen[str]) -> tuple[int, str]:
    output, _ = process.communicate(timeout=300)
    return process.returncode, output


def _wait_for(path: Path, process: subprocess.Popen[str]) -> None:
    """Until ``path`` exists and is not empty, or ``process`` has ended."""
    deadline = time.monotonic() + 120
    while process.poll() is None and time.monotonic() < deadline:
        if path.exists() and path.stat().st_size > 0:
            return
        time.sleep(0.02)


def _test_metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())["test"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, float]:
    """The test metrics of the run without faults, and how long the process took."""
    folder = tmp_path_factory.mktemp("whole")
    started = time.monotonic()
    code, output = _finish(_polytask("train", str(_config(folder))))
    assert code == 0, output
    return _test_metrics(folder / "runs" / "tiny"), time.monotonic() - started


@pytest.mark.parametrize("kill", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT])
def test_killed_at_random_moments_and_resumed_equals_an_uninterrupted_run(
    tmp_path: Path, uninterrupted: tuple[dict, float], kill: signal.Signals
) -> None:
    expected, duration = uninterrupted
    draw = random.Random(int(kill))
    config = _config(tmp_path)
    run_dir = tmp_path / "runs" / "tiny"
    kills = 0
    for _ in range(12):  # kills and restarts, until the run has finished
        if (run_dir / "results.json").exists():
            break
        if (run_dir / "checkpoints" / "last.safetensors").exists():
            process = _polytask("train", "--resume", str(run_dir))
        else:  # killed before its first checkpoint: nothing to resume, start again
            shutil.rmtree(run_dir, ignore_errors=True)
            process = _polytask("train", str(config))
        if kills == 0:  # the first kill surely lands mid-run: just after epoch 1 was recorded
            _wait_for(run_dir / "metrics.jsonl", process)
            time.sleep(draw.uniform(0.0, 0.05) * duration)
        elif kills < 3:
            time.sleep(draw.uniform(0.4, 0.9) * duration)  # a moment anywhere in the run
        if kills < 3 and process.poll() is None:
            process.send_signal(kill)
            kills += 1
        code, output = _finish(process)
        assert "Traceback" not in output, output
        if code == 130:  # stopped cleanly: says how to resume, or that nothing was written
            resumable = (run_dir / "checkpoints" / "last.safetensors").exists()
            said = f"polytask train --resume {run_dir}" if resumable else "interrupted before"
            assert said in output or (run_dir / "results.json").exists(), output
        # a signal that lands while the interpreter starts (nothing printed or written yet) or
        # finishes (the run complete, Python's handlers already restored to the defaults)
        # ends it the default way
        starting = output.strip() == ""
        finished = (run_dir / "results.json").exists()
        by_default = code == -kill and (starting or finished)
        assert code in (0, 130, -signal.SIGKILL) or by_default, (code, output)
    assert (run_dir / "results.json").exists(), "the run never finished"
    assert kills >= 1
    assert _test_metrics(run_dir) == expected
    leftovers = [p.name for p in run_dir.rglob("*") if ".tmp" in p.name]
    assert leftovers == []
    epochs = [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").open()]
    assert epochs == [1, 2, 3, 4]


def _limit_file_size(limit: int) -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG


def test_a_full_disk_during_a_checkpoint_write_is_one_line_and_keeps_what_was_written(
    tmp_path: Path,
) -> None:
    config = _config(tmp_path, epochs=1)
    run_dir = tmp_path / "runs" / "tiny"
    code, output = _finish(_polytask("train", str(config)))
    assert code == 0, output
    best = (run_dir / "checkpoints" / "best.safetensors").read_bytes()
    assert len(best) > 4096
    config_yaml = yaml.safe_load((run_dir / "config.yaml").read_text())
    config_yaml["train"]["epochs"] = 2
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config_yaml))
    # files of at most 4 KiB: metrics.jsonl still fits, a checkpoint does not
    process = _polytask(
        "train", "--resume", str(run_dir), preexec_fn=lambda: _limit_file_size(4096)
    )
    code, output = _finish(process)
    assert code == 1, output
    assert "Traceback" not in output
    assert [line for line in output.splitlines() if line.startswith("error:")], output
    assert (run_dir / "checkpoints" / "best.safetensors").read_bytes() == best
    assert [p.name for p in run_dir.rglob("*") if ".tmp" in p.name] == []


def test_a_corrupted_checkpoint_is_refused_in_one_line(tmp_path: Path) -> None:
    config = _config(tmp_path, epochs=1)
    run_dir = tmp_path / "runs" / "tiny"
    code, output = _finish(_polytask("train", str(config)))
    assert code == 0, output
    best = run_dir / "checkpoints" / "best.safetensors"
    data = bytearray(best.read_bytes())
    data[-100] ^= 0xFF  # a flipped byte inside the last tensor
    best.write_bytes(bytes(data))
    code, output = _finish(_polytask("evaluate", str(run_dir)))
    assert code == 1, output
    assert "Traceback" not in output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "best.safetensors" in errors[0], output
