"""No silent wrong answer, nothing outside the run folder touched, one line for bad input: the
command line's part of it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import yaml
from typer.testing import CliRunner

from cli_checks import one_error_line as _one_error_line
from polytask.cli import app
from polytask.run import RunFolder

runner = CliRunner()


def run(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def test_train_progress_false_in_yaml_is_honoured_and_the_flags_override_it(
    tiny_yaml: Path,
) -> None:
    assert yaml.safe_load(tiny_yaml.read_text())["train"]["progress"] is False
    quiet = run("train", tiny_yaml, "train.epochs=1")
    assert quiet.exit_code == 0, quiet.output
    assert "epoch 1/1" not in quiet.output
    shown = run("train", tiny_yaml, "train.epochs=1", "--progress")
    assert shown.exit_code == 0, shown.output
    assert "epoch 1/1" in shown.output


def test_a_checkpoint_name_cannot_lead_out_of_the_run_folder(tiny_yaml: Path, tmp_path: Path):
    assert run("train", tiny_yaml, "train.epochs=1").exit_code == 0
    rows = tmp_path / "rows.csv"
    rows.write_text(",".join(f"x{i}" for i in range(16)) + "\n" + ",".join(["0"] * 16) + "\n")
    out = _one_error_line(
        run(
            "predict",
            tmp_path / "runs" / "tiny",
            rows,
            "--output",
            tmp_path / "p.csv",
            "--checkpoint",
            "../../tiny/checkpoints/best",
        )
    )
    assert "a checkpoint name inside the run folder" in out
    assert not (tmp_path / "p.csv").exists()


def test_an_output_dir_that_is_a_file_is_one_line_naming_it(tiny_yaml: Path, tmp_path: Path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    out = _one_error_line(run("train", tiny_yaml, f"output_dir={blocker}"))
    assert str(blocker) in out
    assert blocker.read_text() == "not a folder"


def test_results_json_is_strict_json_and_reads_back_nan(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path / "run")
    folder.path.mkdir()
    folder.write_results({"test": {"a": {"auroc": math.nan, "accuracy": 0.5}}, "delta_m": None})
    text = folder.results_path.read_text()

    def refuse(constant: str) -> float:
        raise ValueError(f"bare {constant} in results.json")

    assert json.loads(text, parse_constant=refuse)["test"]["a"]["auroc"] is None
    back = folder.read_results()["test"]["a"]
    assert math.isnan(back["auroc"]) and back["accuracy"] == 0.5


def _interrupted_run(tiny_yaml: Path, tmp_path: Path) -> Path:
    """A run folder whose ``last`` checkpoint is at epoch 1 of 2."""
    assert run("train", tiny_yaml, "train.epochs=1").exit_code == 0
    run_dir = tmp_path / "runs" / "tiny"
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    config["train"]["epochs"] = 2  # as if it had been stopped after epoch 1 of 2
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    return run_dir


def test_resume_refuses_an_edited_config_that_changes_the_model(tiny_yaml: Path, tmp_path):
    run_dir = _interrupted_run(tiny_yaml, tmp_path)
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    config["model"]["encoder_params"]["hidden"] = [32, 32]
    config["optimizer"]["lr"] = 0.5
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    out = _one_error_line(run("train", "--resume", run_dir))
    assert "model.encoder_params.hidden: [16, 16] -> [32, 32]" in out
    assert "optimizer.lr: 0.01 -> 0.5" in out
    assert "not resumable" in out


def test_resume_applies_and_reports_a_resumable_edit(tiny_yaml: Path, tmp_path: Path) -> None:
    run_dir = _interrupted_run(tiny_yaml, tmp_path)
    result = run("train", "--resume", run_dir)
    assert result.exit_code == 0, result.output
    assert "train.epochs: 1 -> 2" in result.output
    epochs = [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").open()]
    assert epochs == [1, 2]


def test_a_run_folder_in_use_is_refused_with_one_line(tiny_yaml: Path, tmp_path: Path) -> None:
    import fcntl

    run_dir = _interrupted_run(tiny_yaml, tmp_path)
    with open(run_dir / ".lock", "a+") as held:  # another process training in it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        out = _one_error_line(run("train", "--resume", run_dir))
    assert f"{run_dir}: in use by" in out
    resumed = run("train", "--resume", run_dir)  # free again
    assert resumed.exit_code == 0, resumed.output


def test_a_run_that_fails_during_setup_leaves_no_folder(tiny_yaml: Path, tmp_path: Path) -> None:
    out = _one_error_line(
        run("train", tiny_yaml, "balancing.method=gradnorm", "train.accumulate_steps=2")
    )
    assert "does not support fp16 loss scaling or gradient accumulation" in out
    assert not (tmp_path / "runs" / "tiny").exists()


def test_sigterm_stops_the_run_naming_its_folder_and_it_resumes(
    tiny_yaml: Path, tmp_path: Path
) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    raw = yaml.safe_load(tiny_yaml.read_text())
    raw["data"]["params"]["num_samples"] = 20000
    raw["train"]["epochs"] = 50
    tiny_yaml.write_text(yaml.safe_dump(raw))
    run_dir = tmp_path / "runs" / "tiny"
    process = subprocess.Popen(
        [sys.executable, "-m", "polytask", "train", str(tiny_yaml)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
    )
    deadline = time.monotonic() + 120
    while not (run_dir / "checkpoints" / "last.safetensors").exists():
        assert process.poll() is None and time.monotonic() < deadline, process.stdout
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 130, output
    assert "Traceback" not in output
    assert f"polytask train --resume {run_dir}" in output
