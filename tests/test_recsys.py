"""The recsys-synthetic dataset: determinism, label semantics, rates, user ids; ESMM on it."""

from __future__ import annotations

import inspect
import math
from pathlib import Path

import numpy as np
import pytest

from polytask.config import parse_config
from polytask.data.bundle import build_bundle
from polytask.data.sources import DATASETS
from polytask.data.sources.recsys import CATEGORICAL_COLUMNS, NUMERIC_COLUMNS, generate_log
from polytask.errors import ConfigError
from polytask.evaluate.ranking import group_codes, ranking_report
from polytask.models import build_model
from polytask.run import train_run

SMALL = {"num_impressions": 4000, "num_users": 200, "num_items": 100}


def build(seed: int = 0, **params: object):
    return DATASETS.get("recsys-synthetic")(seed=seed, **{**SMALL, **params})


def test_registered_with_a_documented_model() -> None:
    builder = DATASETS.get("recsys-synthetic")
    assert DATASETS.provided == ("seed",)
    doc = inspect.getdoc(builder) or ""
    assert "References:" in doc and "f_cvr" in doc and "Bernoulli" in doc
    assert all(p.kind is p.KEYWORD_ONLY for p in inspect.signature(builder).parameters.values())
    with pytest.raises(ConfigError, match="num_users must be >= 1"):
        build(num_users=0)


def test_deterministic_per_seed() -> None:
    a, b, c = build(seed=3), build(seed=3), build(seed=4)
    for key in ("numeric", "categorical"):
        np.testing.assert_array_equal(a.inputs[key], b.inputs[key])
    np.testing.assert_array_equal(a.targets["click"], b.targets["click"])
    np.testing.assert_array_equal(a.targets["conversion"], b.targets["conversion"])
    assert not np.array_equal(a.targets["click"], c.targets["click"])


def test_layout_tasks_and_columns() -> None:
    table = build()
    assert [t.name for t in table.tasks] == ["click", "conversion"]
    assert all(t.kind == "binary" and "log_loss" in t.metric_names for t in table.tasks)
    assert table.inputs["numeric"].shape == (4000, len(NUMERIC_COLUMNS))
    assert table.inputs["categorical"].shape == (4000, len(CATEGORICAL_COLUMNS))
    assert table.categorical_names == CATEGORICAL_COLUMNS and "user_id" in CATEGORICAL_COLUMNS
    assert table.feature_names == NUMERIC_COLUMNS
    table.validate()


def test_conversion_only_after_a_click() -> None:
    table = build(num_impressions=20_000)
    click, conversion = table.targets["click"], table.targets["conversion"]
    assert set(np.unique(click)) == {0.0, 1.0} and set(np.unique(conversion)) == {0.0, 1.0}
    assert np.all(conversion <= click)  # conversion ⊆ click
    assert conversion.sum() > 0


def test_rates_are_plausible() -> None:
    log = generate_log(
        seed=0, num_impressions=50_000, num_users=1000, num_items=500, num_categories=20
    )
    ctr = log.click.mean()
    cvr = log.conversion.sum() / log.click.sum()
    assert 0.05 < ctr < 0.2, ctr
    assert 0.1 < cvr < 0.4, cvr
    assert 0.005 < log.conversion.mean() < 0.05
    # sample selection bias: the clicked impressions convert more often than the average one
    assert log.p_cvr[log.click > 0].mean() > log.p_cvr.mean() + 0.01
    # the two logits are related but not the same
    z_ctr, z_cvr = np.log(log.p_ctr / (1 - log.p_ctr)), np.log(log.p_cvr / (1 - log.p_cvr))
    assert 0.0 < np.corrcoef(z_ctr, z_cvr)[0, 1] < 0.9


def test_user_ids_repeat_and_group_test_rows() -> None:
    table = build()
    users = table.inputs["categorical"][:, CATEGORICAL_COLUMNS.index("user_id")].astype(int)
    assert users.min() >= 0 and users.max() < SMALL["num_users"]
    counts = np.bincount(users)
    assert counts.max() > 3 * np.median(counts[counts > 0])  # heavy users exist
    bundle = build_bundle(table, seed=0)
    groups = group_codes(bundle, "test")
    assert groups.shape == (len(bundle.test),)
    assert (groups != 0).mean() > 0.9  # almost every test user was seen in training
    spec = bundle.input_shape
    assert spec["categorical"]["columns"] == CATEGORICAL_COLUMNS
    assert len(spec["categorical"]["cardinalities"]) == len(CATEGORICAL_COLUMNS)


def test_cvr_task_is_labelled_on_clicks_only() -> None:
    table = build(cvr_task=True)
    cvr, click = table.targets["cvr"], table.targets["click"]
    assert np.isnan(cvr[click == 0]).all()
    np.testing.assert_array_equal(cvr[click == 1], table.targets["conversion"][click == 1])


def test_esmm_with_the_tabular_encoder_trains_one_epoch(tmp_path: Path) -> None:
    config = parse_config(
        {
            "name": "esmm",
            "output_dir": str(tmp_path),
            "data": {"dataset": "recsys-synthetic", "params": SMALL, "batch_size": 256},
            "model": {
                "encoder": "tabular",
                "encoder_params": {"hidden": [16], "crosses": [["device", "hour"]]},
                "architecture": "esmm",
            },
            "train": {"epochs": 1, "progress": False},
        }
    )
    result = train_run(config)
    for task in ("click", "conversion"):
        metrics = result.test[task]
        assert 0.0 <= metrics["auroc"] <= 1.0 and 0.0 < metrics["log_loss"] < 1.0
    assert (result.run_dir / "checkpoints" / "best.safetensors").is_file()

    bundle = build_bundle(build(), seed=0)
    model = build_model(
        bundle.tasks,
        bundle.input_shape,
        encoder="tabular",
        encoder_params={"hidden": [16], "crosses": [["device", "hour"]]},
        architecture="esmm",
    )
    report = ranking_report(model, bundle.test, bundle.tasks, group_codes(bundle, "test"))
    for task in ("click", "conversion"):
        assert not math.isnan(report[task]["auc"]) and report[task]["gauc_groups"] > 0
        assert 0.0 <= report[task]["gauc"] <= 1.0
