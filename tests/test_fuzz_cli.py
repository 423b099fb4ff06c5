"""Property-based fuzzing of the command line: whatever the configuration, overrides or data file,
``polytask`` exits 0 or 1 with one ``error:`` line, never a traceback, and a failed run leaves no
run folder behind.

Each test runs ``POLYTASK_FUZZ_EXAMPLES`` examples (default 15, a bounded CI run);
``scripts/fuzz.sh`` runs many more.
"""

from __future__ import annotations

import copy
import math
import os
import string
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from conftest import TINY
from polytask.cli import app

EXAMPLES = int(os.environ.get("POLYTASK_FUZZ_EXAMPLES", "15"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=os.environ.get("POLYTASK_FUZZ_RANDOM") is None,  # CI: the same examples
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
runner = CliRunner()

#: fields a user edits most, and a few that do not exist
KEYS = [
    "seed",
    "name",
    "data.batch_size",
    "data.val_fraction",
    "data.test_fraction",
    "data.tasks",
    "data.task_weights",
    "data.params.missing_fraction",
    "data.params.input_dim",
    "model.encoder",
    "model.encoder_params.hidden",
    "model.head",
    "model.architecture",
    "balancing.method",
    "balancing.params",
    "optimizer.name",
    "optimizer.lr",
    "optimizer.betas",
    "schedule.name",
    "schedule.warmup_epochs",
    "train.precision",
    "train.grad_clip",
    "train.accumulate_steps",
    "train.early_stopping.metric",
    "evaluate.group_by",
    "data.nonsense",
    "modle.encoder",
]
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(string.printable, max_size=12),
    st.sampled_from(["mlp", "equal", "upgrad", "t1", "t2", "adamw", "fp16", "bf16", "loss"]),
)
VALUES = st.one_of(
    SCALARS,
    st.lists(SCALARS, max_size=3),
    st.dictionaries(st.sampled_from(["t1", "t2", "x", "hidden"]), SCALARS, max_size=2),
)
#: values a user would plausibly write for each key (half the examples draw from these)
PLAUSIBLE: dict[str, st.SearchStrategy[Any]] = {
    "seed": st.integers(-5, 2**40),
    "data.batch_size": st.integers(-2, 64),
    "data.val_fraction": st.floats(-0.5, 1.5),
    "data.tasks": st.lists(st.sampled_from(["t1", "t2", "t3"]), max_size=3),
    "data.task_weights": st.dictionaries(st.sampled_from(["t1", "t2"]), st.floats(-1, 10)),
    "data.params.missing_fraction": st.floats(-0.5, 1.5),
    "data.params.input_dim": st.integers(-2, 32),
    "model.encoder": st.sampled_from(["mlp", "cnn", "tabular", "nope"]),
    "model.encoder_params.hidden": st.lists(st.integers(-4, 32), max_size=3),
    "model.architecture": st.sampled_from(["hard_sharing", "mmoe", "cgc", "mtan", "esmm"]),
    "balancing.method": st.sampled_from(["equal", "upgrad", "mgda", "famo", "nash_mtl", "x"]),
    "optimizer.lr": st.floats(-1, 10),
    "train.precision": st.sampled_from(["fp32", "bf16", "fp16", "fp8"]),
    "train.grad_clip": st.floats(-1, 10),
    "train.accumulate_steps": st.integers(-1, 4),
    "train.early_stopping.metric": st.sampled_from(["loss", "t1/rmse", "t9/rmse", "t1/auc"]),
}


@st.composite
def _override(draw: st.DrawFn) -> tuple[str, Any]:
    key = draw(st.sampled_from(KEYS))
    plausible = PLAUSIBLE.get(key)
    use = plausible is not None and draw(st.booleans())
    return key, draw(plausible if use and plausible is not None else VALUES)


def _yaml_text(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("\n...")


def _sizes_are_small(key: str, value: Any) -> bool:
    """Keep the data and the model small enough to train in a second (huge sizes are a
    resource question, not a validation one)."""
    numbers = (
        [value]
        if not isinstance(value, list | dict)
        else list(value.values() if isinstance(value, dict) else value)
    )
    big = [v for v in numbers if isinstance(v, int | float) and not isinstance(v, bool)]
    if key in ("data.params.input_dim", "model.encoder_params.hidden", "data.batch_size"):
        return all(math.isfinite(v) and abs(v) <= 64 for v in big)
    return True


def _assert_clean(result: Any, output_dir: Path) -> None:
    """Exit 0, or exit 1 with one error line; no traceback; a failure leaves no run folder."""
    assert result.exit_code in (0, 1), (result.exit_code, result.output, result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        result.output,
        repr(result.exception),
    )
    assert "Traceback" not in result.output, result.output
    if result.exit_code == 1:
        errors = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, result.output
        runs = list(output_dir.glob("*")) if output_dir.is_dir() else []
        assert runs == [], (result.output, runs)


def _config(tmp_path: Path) -> tuple[Path, Path]:
    raw = copy.deepcopy(TINY)
    raw["data"]["params"]["num_samples"] = 200
    raw["train"]["epochs"] = 1
    output = tmp_path / "runs"
    raw["output_dir"] = str(output)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path, output


@FUZZ
@given(overrides=st.lists(_override(), min_size=1, max_size=3))
def test_any_override_is_trained_or_refused_in_one_line(
    tmp_path_factory: Any, overrides: list[tuple[str, Any]]
) -> None:
    assume(all(_sizes_are_small(k, v) for k, v in overrides))
    config, output = _config(tmp_path_factory.mktemp("fuzz"))
    texts = [f"{key}={_yaml_text(value)}" for key, value in overrides]
    _assert_clean(runner.invoke(app, ["train", str(config), *texts]), output)


@FUZZ
@given(
    text=st.one_of(
        st.text(max_size=40),
        st.builds("{}={}".format, st.sampled_from(KEYS), st.text(max_size=20)),
    )
)
def test_any_override_string_is_trained_or_refused_in_one_line(
    tmp_path_factory: Any, text: str
) -> None:
    config, output = _config(tmp_path_factory.mktemp("fuzz"))
    _assert_clean(runner.invoke(app, ["train", str(config), text]), output)


@FUZZ
@given(document=st.one_of(st.binary(max_size=64), st.text(max_size=64)))
def test_any_config_file_is_trained_or_refused_in_one_line(
    tmp_path_factory: Any, document: bytes | str
) -> None:
    folder = tmp_path_factory.mktemp("fuzz")
    path = folder / "config.yaml"
    if isinstance(document, bytes):
        path.write_bytes(document)
    else:
        path.write_text(document)
    result = runner.invoke(app, ["train", str(path), f"output_dir={folder / 'runs'}"])
    _assert_clean(result, folder / "runs")


CELLS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-(10**40), 10**40),
    st.sampled_from(["", "abc", "1e39", "-1e39", "nan", " 3 ", "1,5", "0", "1", "2"]),
)


@FUZZ
@given(
    cells=st.lists(st.lists(CELLS, min_size=5, max_size=5), min_size=0, max_size=40),
    duplicate=st.booleans(),
    parquet=st.booleans(),
)
def test_any_data_file_is_trained_or_refused_in_one_line(
    tmp_path_factory: Any, cells: list[list[Any]], duplicate: bool, parquet: bool
) -> None:
    folder = tmp_path_factory.mktemp("fuzz")
    columns = (
        ["a", "b", "c", "label", "kind"] if not duplicate else ["a", "b", "a", "label", "kind"]
    )
    frame = pd.DataFrame(cells, columns=columns) if cells else pd.DataFrame(columns=columns)
    if parquet and not duplicate:  # Parquet cannot hold two columns of one name
        path = folder / "data.parquet"
        frame.apply(pd.to_numeric, errors="coerce").to_parquet(path)
    else:
        path = folder / "data.csv"
        frame.to_csv(path, index=False)
    raw = {
        "name": "fuzz",
        "output_dir": str(folder / "runs"),
        "data": {
            "dataset": "file",
            "params": {
                "path": str(path),
                "tasks": [
                    {"name": "label", "kind": "regression"},
                    {"name": "kind", "kind": "multiclass", "num_classes": 3},
                ],
            },
            "batch_size": 8,
        },
        "model": {"encoder": "mlp", "encoder_params": {"hidden": [8]}},
        "train": {"epochs": 1, "progress": False},
    }
    config = folder / "config.yaml"
    config.write_text(yaml.safe_dump(raw))
    _assert_clean(runner.invoke(app, ["train", str(config)]), folder / "runs")


@pytest.fixture(scope="module")
def trained_tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A trained tiny run (16 input columns x0..x15) to predict with."""
    config, output = _config(tmp_path_factory.mktemp("trained"))
    result = runner.invoke(app, ["train", str(config)])
    assert result.exit_code == 0, result.output
    return output / "tiny"


@FUZZ
@given(
    rows=st.lists(st.lists(CELLS, min_size=16, max_size=16), min_size=0, max_size=20),
    drop=st.one_of(st.just(0), st.integers(0, 16)),
)
def test_any_prediction_file_is_predicted_or_refused_in_one_line(
    trained_tiny: Path, tmp_path_factory: Any, rows: list[list[Any]], drop: int
) -> None:
    folder = tmp_path_factory.mktemp("fuzz")
    columns = [f"x{i}" for i in range(16)]
    frame = pd.DataFrame(rows, columns=columns) if rows else pd.DataFrame(columns=columns)
    frame = frame.drop(columns=columns[:drop])
    source = folder / "rows.csv"
    frame.to_csv(source, index=False)
    target = folder / "out" / "predictions.csv"
    result = runner.invoke(app, ["predict", str(trained_tiny), str(source), "-o", str(target)])
    _assert_clean(result, folder / "no-runs")
    if result.exit_code == 1:
        assert not target.exists()
    else:
        assert len(pd.read_csv(target)) == len(frame)
