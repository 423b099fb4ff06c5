"""Every bad input is one ``error:`` line naming the file and the field, never a traceback."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from polytask.cli import app

runner = CliRunner()


def run(*args: object) -> Any:
    return runner.invoke(app, [str(a) for a in args])


def _error(result: Any) -> str:
    """The error of a failed command: its ``error:`` line and the problem lines under it."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(
        result.exception
    )
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    return result.output


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("model.encoder_params.hidden=abc", "model.encoder_params: hidden must be"),
        ("model.encoder_params.hidden=[16, x]", "model.encoder_params: hidden"),
        ("model.encoder_params.hidden=[-5]", "model.encoder_params"),
        ("model.encoder_params.dropout=lots", "model.encoder_params: dropout must be"),
        ("model.head=mlp", None),  # a valid change, for the next line's sake
        ("data.params.num_samples=abc", "data.params: num_samples must be"),
        ("data.params.num_samples=12.5", "data.params: num_samples must be"),
        ("data.params.correlation=[1]", "data.params: correlation must be"),
        ("balancing.params.init_log_var=high", "balancing.params: init_log_var must be"),
        ("seed=-1", "seed: "),
        ("seed=1.0e+30", "seed: "),
        ("seed=18446744073709551616", "seed: "),
        ("seed=4294967296", "seed: "),
        ("seed=abc", "seed: "),
        ("data.tasks=[]", "data.tasks: "),
        ("data.tasks=[t1, t1]", "data.tasks: "),
    ],
)
def test_a_bad_value_is_one_line_naming_its_field(
    tiny_yaml: Path, tmp_path: Path, override: str, expected: str | None
) -> None:
    result = run("train", tiny_yaml, override, "train.epochs=1")
    if expected is None:
        assert result.exit_code == 0, result.output
        return
    assert expected in _error(result)
    assert not (tmp_path / "runs" / "tiny").exists()


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("model.head_params.hidden=abc", "model.head_params: hidden must be"),
        ("model.head_params.hidden=-3", "model.head_params"),
        ("model.architecture_params.num_experts=two", "model.architecture_params: num_experts"),
        ("model.architecture_params.num_experts=-1", "model.architecture_params"),
    ],
)
def test_head_and_architecture_values(tiny_yaml: Path, override: str, expected: str) -> None:
    head_or_arch = (
        ["model.head=mlp"] if override.startswith("model.head") else ["model.architecture=mmoe"]
    )
    assert expected in _error(run("train", tiny_yaml, *head_or_arch, override, "train.epochs=1"))


def test_a_file_dataset_path_must_be_text(tmp_path: Path, tiny_raw: dict) -> None:
    tiny_raw["data"] = {
        "dataset": "file",
        "params": {"path": 123, "tasks": [{"name": "y", "kind": "regression"}]},
    }
    config = tmp_path / "file.yaml"
    config.write_text(yaml.safe_dump(tiny_raw))
    assert "data.params: path must be str, found 123" in _error(run("train", config))


def test_every_bad_parameter_is_reported_at_once(tiny_yaml: Path) -> None:
    out = _error(
        run(
            "train",
            tiny_yaml,
            "model.encoder_params.hidden=abc",
            "data.params.num_samples=many",
            "balancing.params.init_log_var=high",
        )
    )
    assert "3 problems" in out
    for field in ("model.encoder_params", "data.params", "balancing.params"):
        assert field in out


@pytest.mark.parametrize("content", [b"name: caf\xe9\n", b"\xff\xfe\x00n\x00a\x00m\x00e"])
def test_a_config_that_is_not_utf8_is_one_line(tmp_path: Path, content: bytes) -> None:
    config = tmp_path / "latin1.yaml"
    config.write_bytes(content)
    out = _error(run("train", config))
    assert str(config) in out and "UTF-8" in out


def test_an_unreadable_config_is_one_line(
    tmp_path: Path, tiny_yaml: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = Path.read_bytes

    def refuse(self: Path) -> bytes:  # as chmod 000 does, even for root
        if self == tiny_yaml:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", refuse)
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: refuse(self).decode())
    out = _error(run("train", tiny_yaml))
    assert str(tiny_yaml) in out and "Permission denied" in out
    assert _error(run("train", tmp_path)).count(str(tmp_path)) >= 1  # a folder, not a file
