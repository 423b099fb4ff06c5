"""Users' CSV/Parquet files: reading, every bad-input message, the ``file`` source, writing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from polytask.data.bundle import build_bundle
from polytask.data.files import (
    read_features,
    read_frame,
    table_from_frame,
    tasks_from_dicts,
    write_frame,
)
from polytask.data.sources import DATASETS
from polytask.errors import ConfigError, DataError
from polytask.tasks import TaskSpec

TASKS: list[dict[str, Any]] = [
    {"name": "digit", "kind": "multiclass", "num_classes": 3},
    {"name": "flag", "kind": "binary", "column": "is_flag"},
    {"name": "tags", "kind": "multilabel", "columns": ["tag_a", "tag_b"]},
    {"name": "price", "kind": "regression", "loss": "huber", "weight": 2.0},
]


def sample_frame(n: int = 40) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(
        {
            "x1": rng.normal(size=n),
            "x2": rng.integers(0, 5, size=n),
            "digit": rng.integers(0, 3, size=n).astype(float),
            "is_flag": rng.integers(0, 2, size=n).astype(float),
            "tag_a": rng.integers(0, 2, size=n).astype(float),
            "tag_b": rng.integers(0, 2, size=n).astype(float),
            "price": rng.normal(10, 2, size=n),
            "part": ["train"] * (n - 10) + ["val"] * 5 + ["test"] * 5,
        }
    )
    frame.loc[3, "digit"] = np.nan  # empty cells: missing labels
    frame.loc[4, "is_flag"] = np.nan
    frame.loc[5, "tag_b"] = np.nan
    frame.loc[6, "price"] = np.nan
    return frame


def load(path: Path, **params: Any) -> Any:
    return DATASETS.get("file")(seed=0, path=str(path), **params)


def frame_table(frame: pd.DataFrame, **overrides: Any) -> Any:
    specs, columns = tasks_from_dicts(overrides.pop("tasks", TASKS), source="data.csv")
    kwargs: dict[str, Any] = {"feature_columns": None, "split_column": "part"}
    kwargs.update(overrides)
    return table_from_frame(frame, tasks=specs, label_columns=columns, source="data.csv", **kwargs)


# ----------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("suffix", [".csv", ".csv.gz", ".parquet", ".pq"])
def test_round_trip_through_the_file_source(tmp_path: Path, suffix: str) -> None:
    frame = sample_frame()
    path = tmp_path / f"data{suffix}"
    write_frame(frame, path)
    table = load(path, tasks=TASKS, split_column="part")
    assert table.source == str(path)
    assert table.feature_names == ["x1", "x2"]
    np.testing.assert_allclose(table.inputs, frame[["x1", "x2"]].to_numpy(), rtol=1e-6)
    digit, flag = table.targets["digit"], table.targets["flag"]
    assert digit.dtype == np.int64 and digit[3] == -1 and digit[0] == frame.loc[0, "digit"]
    assert flag.dtype == np.float32 and np.isnan(flag[4]) and np.isnan(flag).sum() == 1
    assert table.targets["tags"].shape == (40, 2) and np.isnan(table.targets["tags"][5, 1])
    assert np.isnan(table.targets["price"][6])
    assert table.split is not None and np.bincount(table.split).tolist() == [30, 5, 5]
    price = next(t for t in table.tasks if t.name == "price")
    assert (price.loss, price.weight) == ("huber", 2.0)
    tags = next(t for t in table.tasks if t.name == "tags")
    assert tags.num_classes == 2
    bundle = build_bundle(table)
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (30, 5, 5)
    assert bundle.input_shape == (2,) and bundle.feature_names == ["x1", "x2"]


def test_file_source_without_split_and_with_explicit_features(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    write_frame(sample_frame(), path)
    tasks = [{"name": "price", "kind": "regression"}]
    table = load(path, tasks=tasks, features=["x2"])
    assert table.feature_names == ["x2"] and table.split is None
    bundle = build_bundle(table, seed=1)
    assert len(bundle.train) + len(bundle.val) + len(bundle.test) == 40


def test_write_frame_is_atomic_and_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "out.csv"
    write_frame(pd.DataFrame({"a": [1, 2]}), path)
    write_frame(pd.DataFrame({"a": [3]}), path)
    assert read_frame(path)["a"].tolist() == [3]
    assert [p.name for p in path.parent.iterdir()] == ["out.csv"]  # no temporary file left
    with pytest.raises(DataError, match=r"out\.txt: unknown file type"):
        write_frame(pd.DataFrame({"a": [1]}), tmp_path / "out.txt")
    assert not list(tmp_path.glob("*.tmp"))


# ----------------------------------------------------------------------------- read_frame
def test_read_frame_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nothing\.csv: no such file"):
        read_frame(tmp_path / "nothing.csv")
    odd = tmp_path / "data.xlsx"
    odd.write_text("a\n1\n")
    with pytest.raises(DataError, match=r"data\.xlsx: unknown file type; use one of .csv, "):
        read_frame(odd)
    broken = tmp_path / "data.parquet"
    broken.write_text("this is not parquet")
    with pytest.raises(DataError, match=r"data\.parquet: cannot read it as parquet"):
        read_frame(broken)
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(DataError, match=r"empty\.csv: cannot read it as csv"):
        read_frame(empty)


# ----------------------------------------------------------------------------- table_from_frame
def test_missing_label_column_lists_the_columns() -> None:
    frame = sample_frame().drop(columns=["is_flag"])
    with pytest.raises(DataError) as info:
        frame_table(frame)
    message = str(info.value)
    assert message.startswith("data.csv: no column 'is_flag' (labels of task 'flag'); columns: ")
    assert "x1, x2, digit, tag_a, tag_b, price, part" in message


def test_multiclass_label_out_of_range_names_the_row() -> None:
    frame = sample_frame()
    frame.loc[7, "digit"] = 3
    with pytest.raises(DataError) as info:
        frame_table(frame)
    assert str(info.value) == (
        "data.csv: data row 8, column 'digit': label 3 of task 'digit' must be an integer "
        "class 0..2 (empty cells are missing labels)"
    )
    frame.loc[7, "digit"] = 1.5
    with pytest.raises(DataError, match=r"data row 8, column 'digit': label 1\.5 of task 'digit'"):
        frame_table(frame)


def test_non_numeric_and_non_binary_labels() -> None:
    frame = sample_frame()
    frame["digit"] = frame["digit"].astype(object)
    frame.loc[0, "digit"] = "cat"
    with pytest.raises(DataError, match="data row 1, column 'digit': 'cat' is not a number"):
        frame_table(frame)
    frame = sample_frame()
    frame.loc[9, "tag_b"] = 2
    with pytest.raises(DataError, match="data row 10, column 'tag_b': label 2 of task 'tags' must"):
        frame_table(frame)


def test_minus_one_is_a_missing_label_too() -> None:
    frame = sample_frame()
    frame.loc[0, ["digit", "is_flag"]] = -1
    table = frame_table(frame)
    assert table.targets["digit"][0] == -1 and np.isnan(table.targets["flag"][0])


def test_non_numeric_feature_names_the_column() -> None:
    frame = sample_frame()
    frame["colour"] = "red"
    with pytest.raises(DataError) as info:
        frame_table(frame)
    assert str(info.value) == (
        "data.csv: data row 1, column 'colour': 'red' is not a number; feature columns must be "
        "numeric: list it under `categorical`, encode it or drop it"
    )


def test_empty_feature_cell_names_row_and_column() -> None:
    frame = sample_frame()
    frame.loc[11, "x2"] = np.nan
    with pytest.raises(DataError, match="data row 12, feature column 'x2': empty, NaN or infinite"):
        frame_table(frame)


def test_bad_split_value() -> None:
    frame = sample_frame()
    frame.loc[2, "part"] = "training"
    with pytest.raises(DataError) as info:
        frame_table(frame)
    assert str(info.value) == (
        "data.csv: data row 3, split column 'part': 'training' is not one of train, val, test"
    )
    frame.loc[2, "part"] = " Train "  # case and spaces are forgiven
    assert frame_table(frame).split[2] == 0


def test_feature_and_label_column_conflicts() -> None:
    with pytest.raises(ConfigError, match=r"column\(s\) \['price'\] are both features and labels"):
        frame_table(sample_frame(), feature_columns=["x1", "price"])
    with pytest.raises(DataError, match="no column 'x9' \\(feature column\\)"):
        frame_table(sample_frame(), feature_columns=["x9"])
    specs = [TaskSpec("tags", "multilabel", num_classes=3)]
    with pytest.raises(ConfigError, match=r"takes 3 label column\(s\), found \['tag_a', 'tag_b'\]"):
        table_from_frame(
            sample_frame(),
            tasks=specs,
            label_columns={"tags": ["tag_a", "tag_b"]},
            feature_columns=None,
            source="data.csv",
        )


# ----------------------------------------------------------------------------- task dicts
@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"name": "a", "kind": "multiclass"}, "task 'a': a multiclass task needs 'num_classes'"),
        ({"name": "a", "kind": "ordinal"}, "task 'a': 'kind' must be one of binary, multiclass"),
        ({"name": "a", "kind": "binary", "colour": 1}, "task 'a': unknown key(s) ['colour']"),
        ({"kind": "binary"}, "task #1: needs a 'name'"),
        ({"name": "a", "kind": "binary", "column": "x", "columns": ["y"]}, "not both"),
        ({"name": "a", "kind": "multilabel", "columns": "x"}, "must be a non-empty list"),
        ({"name": "a", "kind": "binary", "loss": "mse"}, "task 'a': loss 'mse' does not apply"),
        ({"name": "a", "kind": "multiclass", "num_classes": "3"}, "must be an integer"),
    ],
)
def test_bad_task_dicts_name_the_task(entry: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        tasks_from_dicts([entry], source="data.csv")
    assert str(info.value).startswith("data.csv: ")
    assert message in str(info.value)


def test_task_dict_defaults_and_duplicates() -> None:
    specs, columns = tasks_from_dicts(
        [{"name": "y", "kind": "regression", "columns": ["a", "b"], "metrics": ["mae"]}],
        source="f",
    )
    assert (specs[0].num_classes, specs[0].metrics, columns) == (2, ("mae",), {"y": ["a", "b"]})
    with pytest.raises(ConfigError, match="f: task 'y': defined twice"):
        tasks_from_dicts([{"name": "y", "kind": "binary"}] * 2, source="f")
    with pytest.raises(ConfigError, match="at least one task"):
        tasks_from_dicts([], source="f")


# ----------------------------------------------------------------------------- read_features
def test_read_features(tmp_path: Path) -> None:
    path = tmp_path / "new.parquet"
    write_frame(pd.DataFrame({"b": [1.0, 2.0], "a": [3, 4], "note": ["x", "y"]}), path)
    x = read_features(path, ["a", "b"])
    assert x.dtype == np.float32
    np.testing.assert_array_equal(x, [[3, 1], [4, 2]])
    with pytest.raises(DataError, match=r"new\.parquet: missing feature column\(s\) 'c', 'd'"):
        read_features(path, ["a", "c", "d"])
    holes = tmp_path / "holes.csv"
    holes.write_text("a,b\n1,2\n3,\n")
    with pytest.raises(DataError, match=r"holes\.csv: data row 2, feature column 'b': empty"):
        read_features(holes, ["a", "b"])


# ----------------------------------------------------------------- no silent wrong data
def test_a_duplicate_column_name_in_a_csv_is_an_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    # pandas alone reads the second `price` as `price.1`, a feature equal to the label
    path.write_text("x1,price,x2,price\n1,2,3,2\n4,5,6,5\n")
    with pytest.raises(DataError, match=r"data.csv: duplicate column name\(s\) 'price'") as err:
        read_frame(path)
    assert "columns 2, 4" in str(err.value)
    with pytest.raises(DataError, match="duplicate column"):
        load(path, tasks=[{"name": "price", "kind": "regression"}])


def test_a_duplicate_column_name_in_a_parquet_file_is_an_error_naming_it(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "data.parquet"
    arrays = [pa.array([1.0, 2.0]), pa.array([0.0, 1.0]), pa.array([0.0, 1.0])]
    pq.write_table(pa.table(arrays, names=["x", "y", "y"]), path)
    with pytest.raises(DataError, match=r"duplicate column name\(s\) 'y'"):
        read_frame(path)


def test_a_regression_label_beyond_float32_is_an_error_naming_column_and_row(
    tmp_path: Path,
) -> None:
    frame = sample_frame()
    frame.loc[7, "price"] = 1e39  # float32 would make it inf, then a "missing" label
    path = tmp_path / "data.csv"
    frame.to_csv(path, index=False)
    with pytest.raises(
        DataError, match=r"data row 8, column 'price': 1e\+39 is beyond the float32"
    ):
        load(path, tasks=TASKS, split_column="part")


def test_a_feature_beyond_float32_is_an_error_naming_column_and_row() -> None:
    frame = sample_frame()
    frame.loc[2, "x1"] = -3e40
    with pytest.raises(DataError, match=r"data row 3, column 'x1': -3e\+40 is beyond the float32"):
        frame_table(frame)


def test_the_file_source_records_the_file_fingerprint(tmp_path: Path) -> None:
    import hashlib

    path = tmp_path / "data.csv"
    sample_frame().to_csv(path, index=False)
    table = load(path, tasks=TASKS, split_column="part")
    assert table.fingerprint == {
        "file": str(path),
        "size": path.stat().st_size,
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
    }
    bundle = build_bundle(table, val_fraction=0.1, test_fraction=0.1, seed=0)
    assert bundle.info["datasets"][0]["fingerprint"] == table.fingerprint
