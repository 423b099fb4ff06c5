"""Built-in datasets: shapes, tasks, determinism, label semantics and the registry contract."""

from __future__ import annotations

import inspect
import time

import numpy as np
import pytest

from polytask.data.bundle import build_bundle
from polytask.data.sources import DATASETS, river_data
from polytask.data.sources.common import hide_labels
from polytask.data.sources.digits import DIGIT_SIDE, canvas_side, make_digit_pairs, split_pools
from polytask.data.sources.synthetic import gram_factor, mmoe_parameters
from polytask.data.table import MultiLabelTable
from polytask.errors import ConfigError, DataError
from polytask.tasks import TaskSpec

SMALL_DIGITS = {"num_train": 400, "num_val": 100, "num_test": 100}


def build(name: str, **params: object) -> MultiLabelTable:
    return DATASETS.get(name)(**params)


def assert_same(a: MultiLabelTable, b: MultiLabelTable) -> None:
    np.testing.assert_array_equal(a.inputs, b.inputs)
    assert a.targets.keys() == b.targets.keys()
    for name in a.targets:
        np.testing.assert_array_equal(a.targets[name], b.targets[name])


# ----------------------------------------------------------------------------- registry
def test_registry_lists_every_source() -> None:
    expected = {
        "file",
        "mmoe-synthetic",
        "multi-digits",
        "solar-flare",
        "yeast",
        "recsys-synthetic",
    }
    assert expected <= set(DATASETS.names())


@pytest.mark.parametrize("name", ["file", "mmoe-synthetic", "multi-digits", "solar-flare", "yeast"])
def test_builder_contract(name: str) -> None:
    builder = DATASETS.get(name)
    assert DATASETS.provided == ("seed",)
    doc = inspect.getdoc(builder) or ""
    assert name == "file" or "References:" in doc  # built-in sources cite their origin
    params = inspect.signature(builder).parameters
    assert all(p.kind is p.KEYWORD_ONLY for p in params.values())
    assert params["seed"].default is inspect.Parameter.empty
    required = [k for k, p in DATASETS.parameters(name).items() if p.default is p.empty]
    assert required == (["path", "tasks"] if name == "file" else [])
    assert DATASETS.check_params(name, {"bogus": 1})[0].startswith("unknown parameter 'bogus'")


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("multi-digits", SMALL_DIGITS),
        ("mmoe-synthetic", {"num_samples": 500}),
        ("yeast", {}),
        ("solar-flare", {}),
    ],
)
def test_every_source_builds_a_bundle(name: str, params: dict[str, object]) -> None:
    table = build(name, seed=3, **params)
    bundle = build_bundle(table, seed=3)
    assert bundle.info["source"] == name
    assert len(bundle.train) > len(bundle.val) > 0
    assert [t.name for t in bundle.tasks] == [t.name for t in table.tasks]


def test_hide_labels_per_kind() -> None:
    tasks = [
        TaskSpec("c", "multiclass", num_classes=3),
        TaskSpec("b", "binary"),
        TaskSpec("m", "multilabel", num_classes=2),
        TaskSpec("r", "regression"),
    ]
    targets: dict[str, np.ndarray] = {
        "c": np.zeros(200, dtype=np.int64),
        "b": np.zeros(200, dtype=np.float32),
        "m": np.zeros((200, 2), dtype=np.float32),
        "r": np.zeros(200, dtype=np.float32),
    }
    hidden = hide_labels(targets, tasks, fraction=0.25, seed=0)
    assert (hidden["c"] == -1).sum() == 50
    assert np.isnan(hidden["b"]).sum() == 50 and np.isnan(hidden["r"]).sum() == 50
    rows = np.isnan(hidden["m"])
    assert rows.all(axis=1).sum() == 50 == rows.any(axis=1).sum()
    assert not np.array_equal(np.isnan(hidden["b"]), np.isnan(hidden["r"]))  # independent per task
    assert (targets["c"] == 0).all()  # the input is not modified
    assert hide_labels(targets, tasks, fraction=0.0, seed=0) is targets
    with pytest.raises(ConfigError, match=r"missing_fraction must be in \[0, 1\), found 1.0"):
        hide_labels(targets, tasks, fraction=1.0, seed=0)


# ----------------------------------------------------------------------------- multi-digits
@pytest.fixture(scope="module")
def digits_table() -> MultiLabelTable:
    return build("multi-digits", seed=0)


def test_multi_digits_defaults_are_fast_and_shaped(digits_table: MultiLabelTable) -> None:
    start = time.perf_counter()
    build("multi-digits", seed=1)
    assert time.perf_counter() - start < 2.0
    table = digits_table
    assert table.inputs.shape == (15_000, 1, 16, 16) and table.inputs.dtype == np.float32
    assert table.inputs.min() >= 0.0 and table.inputs.max() <= 1.0
    assert table.source == "multi-digits"
    assert [(t.name, t.kind, t.num_classes) for t in table.tasks] == [
        ("left", "multiclass", 10),
        ("right", "multiclass", 10),
        ("sum", "regression", 1),
        ("both_even", "binary", 1),
    ]
    assert table.split is not None
    assert np.bincount(table.split).tolist() == [12_000, 1_500, 1_500]
    assert table.targets["left"].dtype == np.int64 and table.targets["sum"].dtype == np.float32
    table.validate()


def test_multi_digits_label_semantics(digits_table: MultiLabelTable) -> None:
    y = digits_table.targets
    np.testing.assert_array_equal(y["sum"], y["left"] + y["right"])
    np.testing.assert_array_equal(y["both_even"], (y["left"] % 2 == 0) & (y["right"] % 2 == 0))
    assert set(np.unique(y["left"])) == set(range(10)) == set(np.unique(y["right"]))
    assert 0.2 < y["both_even"].mean() < 0.3  # about a quarter


def test_multi_digits_canvas_is_max_of_the_two_pasted_digits() -> None:
    from sklearn.datasets import load_digits

    images = load_digits().images / 16.0
    for overlap in (0, 2, 5):
        pairs = make_digit_pairs(num_train=20, num_val=5, num_test=5, overlap=overlap, seed=7)
        side = canvas_side(overlap)
        assert pairs.images.shape == (30, 1, side, side)
        for i in range(30):
            top1, left1, top2, left2 = pairs.offsets[i]
            assert 0 <= top1 <= 2 and 0 <= left1 <= 2  # ±1 jitter around (1, 1)
            assert top2 - (DIGIT_SIDE - overlap) in (0, 1, 2)
            expected = np.zeros((side, side))
            second = np.zeros((side, side))
            expected[top1 : top1 + 8, left1 : left1 + 8] = images[pairs.left_index[i]]
            second[top2 : top2 + 8, left2 : left2 + 8] = images[pairs.right_index[i]]
            np.testing.assert_allclose(pairs.images[i, 0], np.maximum(expected, second), atol=1e-6)


def test_multi_digits_pools_are_disjoint_and_pairs_stay_in_their_pool() -> None:
    pairs = make_digit_pairs(num_train=3000, num_val=500, num_test=500, overlap=2, seed=5)
    train, val, test = pairs.pools
    assert len(train) + len(val) + len(test) == 1797
    assert not set(train) & set(val) and not set(train) & set(test) and not set(val) & set(test)
    assert 0.68 < len(train) / 1797 < 0.72 and 0.13 < len(test) / 1797 < 0.17
    for code, pool in enumerate(pairs.pools):
        rows = pairs.split == code
        assert np.isin(pairs.left_index[rows], pool).all()
        assert np.isin(pairs.right_index[rows], pool).all()


def test_split_pools_is_stratified_and_seeded() -> None:
    labels = np.repeat(np.arange(10), 100)
    pools = split_pools(labels, seed=0)
    for pool, expected in zip(pools, (70, 15, 15), strict=True):
        assert np.bincount(labels[pool], minlength=10).tolist() == [expected] * 10
    again = split_pools(labels, seed=0)
    other = split_pools(labels, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(pools, again, strict=True))
    assert not np.array_equal(pools[2], other[2])


def test_multi_digits_determinism_and_missing_labels() -> None:
    a = build("multi-digits", seed=4, **SMALL_DIGITS)
    assert_same(a, build("multi-digits", seed=4, **SMALL_DIGITS))
    assert not np.array_equal(a.inputs, build("multi-digits", seed=5, **SMALL_DIGITS).inputs)
    hidden = build("multi-digits", seed=4, missing_fraction=0.3, **SMALL_DIGITS)
    np.testing.assert_array_equal(hidden.inputs, a.inputs)  # only labels change
    n = len(a.inputs)
    assert (hidden.targets["left"] == -1).sum() == round(0.3 * n)
    assert (hidden.targets["right"] == -1).sum() == round(0.3 * n)
    assert np.isnan(hidden.targets["sum"]).sum() == round(0.3 * n)
    assert np.isnan(hidden.targets["both_even"]).sum() == round(0.3 * n)
    kept = hidden.targets["left"] >= 0
    np.testing.assert_array_equal(hidden.targets["left"][kept], a.targets["left"][kept])
    build_bundle(hidden)


def test_multi_digits_bad_parameters() -> None:
    with pytest.raises(ConfigError, match=r"overlap must be in 0\.\.8, found 9"):
        build("multi-digits", seed=0, overlap=9)
    with pytest.raises(ConfigError, match="num_train must be >= 1, found 0"):
        build("multi-digits", seed=0, num_train=0)


# ----------------------------------------------------------------------------- mmoe-synthetic
def test_mmoe_synthetic_shapes_and_determinism() -> None:
    table = build("mmoe-synthetic", seed=0, num_samples=2000, num_tasks=3, input_dim=20)
    assert table.inputs.shape == (2000, 20) and table.inputs.dtype == np.float32
    assert table.feature_names == [f"x{i}" for i in range(20)]
    assert [(t.name, t.kind) for t in table.tasks] == [(f"t{k}", "regression") for k in (1, 2, 3)]
    assert all(y.shape == (2000,) and y.dtype == np.float32 for y in table.targets.values())
    assert table.split is None and table.source == "mmoe-synthetic"
    assert_same(table, build("mmoe-synthetic", seed=0, num_samples=2000, num_tasks=3, input_dim=20))
    other = build("mmoe-synthetic", seed=1, num_samples=2000, num_tasks=3, input_dim=20)
    assert not np.array_equal(table.targets["t1"], other.targets["t1"])
    hidden = build("mmoe-synthetic", seed=0, num_samples=1000, missing_fraction=0.1)
    assert np.isnan(hidden.targets["t2"]).sum() == 100


@pytest.mark.parametrize(
    ("num_tasks", "correlation"), [(2, 0.5), (2, -1.0), (2, 1.0), (2, 0.0), (4, 0.8), (4, -1 / 3)]
)
def test_mmoe_weights_have_the_requested_cosine(num_tasks: int, correlation: float) -> None:
    params = mmoe_parameters(
        num_tasks=num_tasks, input_dim=30, correlation=correlation, scale=2.0, num_sin=10, seed=0
    )
    w = params.weights
    norms = np.linalg.norm(w, axis=1)
    np.testing.assert_allclose(norms, 2.0, atol=1e-10)
    cosine = (w @ w.T) / np.outer(norms, norms)
    off = ~np.eye(num_tasks, dtype=bool)
    np.testing.assert_allclose(cosine[off], correlation, atol=1e-10)


def test_mmoe_two_tasks_follow_the_paper_construction() -> None:
    """w1 = c u1, w2 = c (p u1 + sqrt(1 - p^2) u2) with orthonormal u1, u2."""
    w = mmoe_parameters(
        num_tasks=2, input_dim=50, correlation=0.3, scale=1.0, num_sin=10, seed=2
    ).weights
    u1 = w[0]
    u2 = (w[1] - 0.3 * u1) / np.sqrt(1 - 0.3**2)
    np.testing.assert_allclose([u1 @ u1, u2 @ u2, u1 @ u2], [1.0, 1.0, 0.0], atol=1e-10)
    factor = gram_factor(np.array([[1.0, 0.3], [0.3, 1.0]]))
    np.testing.assert_allclose(factor, [[1.0, 0.0], [0.3, np.sqrt(1 - 0.09)]])


def test_mmoe_labels_follow_the_formula_and_correlation() -> None:
    """Empirical Pearson correlation of the linear parts w_k.x equals the cosine, and the
    residual of the formula is the N(0, 0.1^2) noise."""
    kwargs = {"num_tasks": 3, "input_dim": 40, "correlation": 0.6, "scale": 1.0, "num_sin": 10}
    table = build("mmoe-synthetic", seed=9, num_samples=20_000, **kwargs)
    params = mmoe_parameters(seed=9, **kwargs)  # type: ignore[arg-type]
    linear = table.inputs.astype(np.float64) @ params.weights.T
    corr = np.corrcoef(linear, rowvar=False)
    off = ~np.eye(3, dtype=bool)
    np.testing.assert_allclose(corr[off], 0.6, atol=0.02)
    waves = np.sin(linear[:, :, None] * params.alpha + params.beta).sum(axis=-1)
    y = np.stack([table.targets[f"t{k}"] for k in (1, 2, 3)], axis=1)
    residual = y - linear - waves
    assert abs(residual.mean()) < 0.01
    assert 0.095 < residual.std() < 0.105


def test_mmoe_bad_parameters() -> None:
    with pytest.raises(
        ConfigError, match=r"with 4 tasks the correlation must be in \[-0\.3333, 1\]"
    ):
        build("mmoe-synthetic", seed=0, num_tasks=4, correlation=-0.5)
    with pytest.raises(ConfigError, match=r"num_tasks must be in 1..input_dim \(3\), found 4"):
        build("mmoe-synthetic", seed=0, num_tasks=4, input_dim=3)


# ----------------------------------------------------------------------------- real data
def test_yeast_binary_tasks() -> None:
    table = build("yeast", seed=0)
    assert table.inputs.shape == (2417, 103) and table.inputs.dtype == np.float32
    assert table.feature_names == [f"Att{i}" for i in range(1, 104)]
    assert [t.name for t in table.tasks] == [f"class{i}" for i in range(1, 15)]
    assert all(t.kind == "binary" for t in table.tasks)
    for y in table.targets.values():
        assert y.shape == (2417,) and set(np.unique(y)) == {0.0, 1.0}
    assert_same(table, build("yeast", seed=1))  # the data do not depend on the seed


def test_yeast_multilabel_task() -> None:
    table = build("yeast", seed=0, as_tasks="multilabel")
    (task,) = table.tasks
    assert (task.name, task.kind, task.num_classes) == ("functions", "multilabel", 14)
    y = table.targets["functions"]
    assert y.shape == (2417, 14) and y.dtype == np.float32
    np.testing.assert_array_equal(y[:, 2], build("yeast", seed=0).targets["class3"])
    assert 4.0 < y.sum(axis=1).mean() < 4.5  # the known label cardinality, 4.24
    with pytest.raises(ConfigError, match="as_tasks must be 'binary' or 'multilabel'"):
        build("yeast", seed=0, as_tasks="wide")


def test_solar_flare() -> None:
    table = build("solar-flare", seed=0)
    assert table.inputs.shape[0] == 1066 and table.inputs.dtype == np.float32
    assert [(t.name, t.kind) for t in table.tasks] == [
        ("c_class_flares", "regression"),
        ("m_class_flares", "regression"),
        ("x_class_flares", "regression"),
    ]
    assert table.feature_names is not None and "zurich-class=H" in table.feature_names
    assert all("=" in name for name in table.feature_names)
    np.testing.assert_array_equal(table.inputs.sum(axis=1), 10.0)  # one hot per attribute
    assert table.targets["x_class_flares"].max() == 2.0
    hidden = build("solar-flare", seed=0, missing_fraction=0.5)
    assert np.isnan(hidden.targets["c_class_flares"]).sum() == 533


@pytest.mark.parametrize("name", ["yeast", "solar-flare"])
def test_real_data_needs_river(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(river_data, "find_spec", lambda _name: None)
    message = f"the {name} dataset needs the 'river' package: pip install 'polytask[datasets]'"
    with pytest.raises(DataError) as info:
        build(name, seed=0)
    assert str(info.value) == message
