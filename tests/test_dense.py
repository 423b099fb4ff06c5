"""Dense task kinds (segmentation, depth, normals): losses, masks and metrics against
torchmetrics and NumPy computations by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

from polytask.config import parse_config
from polytask.data.sources import load_dataset
from polytask.data.sources.dense_shapes import CAMERA_HEIGHT
from polytask.errors import ConfigError, DataError
from polytask.evaluate.compare import delta_m
from polytask.models import build_model
from polytask.run import train_run
from polytask.tasks import TaskSpec, compute_metrics
from polytask.train.runlog import read_metrics


def _feed(task: TaskSpec, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    metrics = task.make_metrics()
    for output, target in batches:
        task.update_metrics(metrics, output, target)
    return compute_metrics(metrics)


def test_segmentation_metrics_match_torchmetrics() -> None:
    gen = torch.Generator().manual_seed(0)
    task = TaskSpec("seg", "segmentation", num_classes=5)
    batches = []
    for _ in range(3):
        output = torch.randn(2, 5, 6, 7, generator=gen)
        target = torch.randint(-1, 5, (2, 6, 7), generator=gen)
        batches.append((output, target))
    got = _feed(task, batches)
    jaccard = MulticlassJaccardIndex(5, average="macro", ignore_index=-1)
    accuracy = MulticlassAccuracy(5, average="micro", ignore_index=-1)
    for output, target in batches:
        jaccard.update(output.argmax(1), target)
        accuracy.update(output.argmax(1), target)
    assert got["miou"] == pytest.approx(float(jaccard.compute()), abs=1e-6)
    assert got["pixel_accuracy"] == pytest.approx(float(accuracy.compute()), abs=1e-6)
    # by hand, pixel accuracy: correct labelled pixels / labelled pixels
    correct = sum(int(((o.argmax(1) == t) & (t >= 0)).sum()) for o, t in batches)
    labelled = sum(int((t >= 0).sum()) for _, t in batches)
    assert got["pixel_accuracy"] == pytest.approx(correct / labelled, abs=1e-6)


def test_segmentation_loss_ignores_pixels() -> None:
    task = TaskSpec("seg", "segmentation", num_classes=3)
    output = torch.randn(1, 3, 2, 2)
    target = torch.tensor([[[0, -1], [2, -1]]])
    loss, count = task.compute_loss(output, target)
    expected = torch.nn.functional.cross_entropy(
        output.permute(0, 2, 3, 1)[target >= 0], target[target >= 0]
    )
    assert int(count) == 2 and float(loss) == pytest.approx(float(expected), rel=1e-6)
    loss, count = task.compute_loss(output, torch.full((1, 2, 2), -1))
    assert float(loss) == 0.0 and int(count) == 0


def test_depth_loss_and_metrics_by_hand() -> None:
    rng = np.random.default_rng(1)
    task = TaskSpec("depth", "depth")
    pred = rng.uniform(0.5, 3.0, (4, 1, 5, 5)).astype(np.float32)
    truth = rng.uniform(0.5, 3.0, (4, 1, 5, 5)).astype(np.float32)
    truth[rng.random(truth.shape) < 0.3] = 0.0  # no depth
    truth[0, 0, 0, 0] = np.nan
    valid = np.isfinite(truth) & (np.nan_to_num(truth) > 0)
    out_t, truth_t = torch.from_numpy(pred), torch.from_numpy(truth)
    loss, count = task.compute_loss(out_t, truth_t)
    diff = np.abs(pred - np.nan_to_num(truth))[valid]
    assert int(count) == valid.sum()
    assert float(loss) == pytest.approx(diff.mean(), rel=1e-5)
    got = _feed(task, [(out_t[:2], truth_t[:2]), (out_t[2:], truth_t[2:])])
    assert got["abs_err"] == pytest.approx(diff.mean(), rel=1e-6)
    assert got["rel_err"] == pytest.approx((diff / truth[valid]).mean(), rel=1e-6)
    assert task.higher_is_better("abs_err") is False
    assert task.higher_is_better("rel_err") is False


def _unit(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    v = rng.normal(size=shape).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_normals_loss_and_metrics_by_hand() -> None:
    rng = np.random.default_rng(2)
    task = TaskSpec("normal", "normals", num_classes=3)
    truth = _unit(rng, (3, 3, 16, 16))
    pred = truth + rng.normal(scale=0.4, size=truth.shape).astype(np.float32)  # unnormalised
    truth[:, :, :2] = 0.0  # two rows without a normal
    valid = np.abs(truth).sum(axis=1) > 0
    loss, count = task.compute_loss(torch.from_numpy(pred), torch.from_numpy(truth))
    unit_pred = pred / np.linalg.norm(pred, axis=1, keepdims=True)
    cosine = np.clip((unit_pred * truth).sum(axis=1), -1, 1)[valid]
    angle = np.degrees(np.arccos(cosine))
    assert int(count) == valid.sum()
    assert float(loss) == pytest.approx((1 - cosine).mean(), rel=1e-4)
    got = _feed(task, [(torch.from_numpy(pred), torch.from_numpy(truth))])
    assert got["mean_angle"] == pytest.approx(angle.mean(), rel=1e-5)
    assert got["median_angle"] == pytest.approx(np.median(angle), abs=0.02)
    for name, threshold in (("within_11_25", 11.25), ("within_22_5", 22.5), ("within_30", 30)):
        assert got[name] == pytest.approx(100 * (angle < threshold).mean(), abs=1e-4)
        assert task.higher_is_better(name) is True
    assert task.higher_is_better("median_angle") is False


def test_dense_metric_of_nothing_labelled_is_nan() -> None:
    task = TaskSpec("depth", "depth")
    got = _feed(task, [(torch.ones(1, 1, 2, 2), torch.zeros(1, 1, 2, 2))])
    assert math.isnan(got["abs_err"])


@pytest.mark.parametrize(
    ("kind", "num_classes", "message"),
    [
        ("segmentation", 1, "num_classes >= 2"),
        ("depth", 3, "depth task has num_classes 1"),
        ("normals", 1, "normals task has num_classes 3"),
    ],
)
def test_dense_spec_problems(kind: str, num_classes: int, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TaskSpec("t", kind, num_classes=num_classes)  # type: ignore[arg-type]


def test_dense_metric_names_checked() -> None:
    with pytest.raises(ConfigError, match="metric 'rmse' does not apply to depth"):
        TaskSpec("d", "depth", metrics=("rmse",))
    spec = TaskSpec("s", "segmentation", num_classes=4, metrics=("miou",))
    assert TaskSpec.from_dict(spec.to_dict()) == spec


def test_delta_m_uses_each_dense_metrics_direction() -> None:
    tasks = [
        TaskSpec("s", "segmentation", num_classes=3, metrics=("miou",)),
        TaskSpec("d", "depth", metrics=("abs_err",)),
    ]
    # mIoU 0.6 vs 0.5: +20 %; depth error 0.3 vs 0.4: +25 % (lower is better)
    got = delta_m(
        {"s": {"miou": 0.6}, "d": {"abs_err": 0.3}},
        {"s": {"miou": 0.5}, "d": {"abs_err": 0.4}},
        tasks,
    )
    assert got == pytest.approx(22.5)


def test_dense_shapes_labels_follow_the_geometry() -> None:
    table = load_dataset("dense-shapes", {"num_samples": 40, "size": 24}, seed=3)
    table.validate()
    image, seg = table.inputs, table.targets["segment"]
    depth, normal = table.targets["depth"], table.targets["normal"]
    assert image.shape == (40, 3, 24, 24) and image.dtype == np.float32
    assert seg.shape == (40, 24, 24) and set(np.unique(seg)) <= {0, 1, 2, 3}
    assert {1, 2, 3} <= set(np.unique(seg))  # every object kind appears
    assert np.allclose(np.linalg.norm(normal, axis=1), 1.0, atol=1e-5)
    valid = depth[:, 0] > 0
    assert 0.9 < valid.mean() < 1.0  # a few sensor holes
    assert (depth[:, 0][valid] < CAMERA_HEIGHT).all()
    # objects rise above the plane: nearer to the camera than the plane pixels around them
    plane, objects = depth[:, 0][valid & (seg == 0)], depth[:, 0][valid & (seg > 0)]
    assert objects.mean() < plane.mean()
    # box tops are flat: straight up; the plane is tilted, hemispheres and cones curve
    assert np.allclose(normal[:, 2][seg == 3], 1.0, atol=1e-6)
    assert (normal[:, 2][seg == 1] < 0.999).mean() > 0.5
    # depth is the height field: on the (planar) background its gradient is the plane's tilt,
    # which matches the normal: n ∝ (−∂H/∂x, −∂H/∂y, 1) with H = CAMERA_HEIGHT − depth
    i = 0
    rows, cols = np.nonzero((seg[i] == 0) & valid[i])
    r, c = rows[(rows + 1 < 24) & (cols + 1 < 24)][0], cols[(rows + 1 < 24) & (cols + 1 < 24)][0]
    if seg[i, r, c + 1] == 0 and valid[i, r, c + 1]:
        slope_x = -(depth[i, 0, r, c + 1] - depth[i, 0, r, c]) * 24
        assert -normal[i, 0, r, c] / normal[i, 2, r, c] == pytest.approx(slope_x, abs=1e-3)
    again = load_dataset("dense-shapes", {"num_samples": 40, "size": 24}, seed=3)
    assert np.array_equal(again.inputs, image)


def test_dense_shapes_bad_parameters_are_named() -> None:
    with pytest.raises(ConfigError, match="dense-shapes: num_samples must be >= 10"):
        load_dataset("dense-shapes", {"num_samples": 2}, seed=0)


def test_dense_model_shapes_and_wrong_head() -> None:
    tasks = [
        TaskSpec("seg", "segmentation", num_classes=4),
        TaskSpec("depth", "depth"),
        TaskSpec("normal", "normals", num_classes=3),
    ]
    model = build_model(
        tasks,
        (3, 12, 18),
        encoder="dense_cnn",
        head="dense",
        encoder_params={"channels": [4, 4, 4], "out_features": 4},
    )
    out = model(torch.randn(2, 3, 12, 18)).outputs
    assert out["seg"].shape == (2, 4, 12, 18)
    assert out["depth"].shape == (2, 1, 12, 18) and out["normal"].shape == (2, 3, 12, 18)
    with pytest.raises(ConfigError, match="'dense' predicts per pixel"):
        build_model([TaskSpec("y", "regression")], (3, 8, 8), encoder="dense_cnn", head="dense")
    with pytest.raises(ConfigError, match="dense_cnn needs 3 widths"):
        build_model(
            tasks, (3, 8, 8), encoder="dense_cnn", head="dense", encoder_params={"channels": [4, 4]}
        )


def _dense_run(tmp_path, *, num_samples: int, batch_size: int, width: int, epochs: int) -> dict:
    """A tiny dense-shapes run configuration (16×16 scenes, dense_cnn + dense heads)."""
    return {
        "name": "dense-tiny",
        "seed": 0,
        "output_dir": str(tmp_path / "runs"),
        "data": {
            "dataset": "dense-shapes",
            "params": {"num_samples": num_samples, "size": 16},
            "batch_size": batch_size,
        },
        "model": {
            "encoder": "dense_cnn",
            "head": "dense",
            "head_params": {"hidden": width},
            "encoder_params": {"channels": [width] * 3, "out_features": width},
        },
        "train": {"epochs": epochs, "progress": False},
    }


def test_dense_shapes_run_trains_all_three_tasks(tmp_path) -> None:
    raw = _dense_run(tmp_path, num_samples=160, batch_size=16, width=8, epochs=3)
    raw["optimizer"] = {"name": "adamw", "lr": 0.01}
    result = train_run(parse_config(raw), run_dir=tmp_path / "run")
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    first, last = records[0]["val"], records[-1]["val"]
    for task in ("segment", "depth", "normal"):
        assert last[task]["loss"] < first[task]["loss"]
    assert 0 < result.test["segment"]["miou"] <= 1
    # depths are about 2.3 (predicting 0 errs by that): well below it after three short epochs
    assert result.test["depth"]["abs_err"] < 1.7
    assert result.test["normal"]["mean_angle"] < 45


def _write_npy_folder(root, layout: dict[str, tuple[int, ...]], counts: dict[str, int]) -> None:
    rng = np.random.default_rng(0)
    for part, n in counts.items():
        for folder, shape in layout.items():
            (root / part / folder).mkdir(parents=True)
            for i in range(n):
                if folder.startswith("label"):
                    classes = int(folder.split("_")[1]) if "_" in folder else 13
                    array = rng.integers(-1, classes, shape).astype(np.float32)
                else:
                    array = rng.random(shape, dtype=np.float32)
                np.save(root / part / folder / f"{i}.npy", array)


NYU = {"image": (288, 384, 3), "label": (288, 384), "depth": (288, 384, 1), "normal": (288, 384, 3)}


def test_nyuv2_loader_reads_the_mtan_layout(tmp_path) -> None:
    _write_npy_folder(tmp_path, NYU, {"train": 3, "val": 2})
    table = load_dataset("nyuv2", {"path": str(tmp_path), "check_counts": False}, seed=0)
    table.validate()
    assert table.inputs.shape == (5, 3, 288, 384)
    assert table.targets["segment"].shape == (5, 288, 384)
    assert table.targets["segment"].dtype == np.int64 and table.targets["segment"].min() == -1
    assert table.targets["depth"].shape == (5, 1, 288, 384)
    assert table.targets["normal"].shape == (5, 3, 288, 384)
    first = np.moveaxis(np.load(tmp_path / "train" / "normal" / "0.npy"), -1, 0)
    assert np.array_equal(table.targets["normal"][0], first)
    assert table.split is not None and list(table.split[3:]) == [2, 2]  # val folder = test
    # the published counts are checked by default
    with pytest.raises(DataError, match=r"train/image: 3 files, expected 795"):
        load_dataset("nyuv2", {"path": str(tmp_path)}, seed=0)


def test_dense_folder_layout_errors_name_the_place(tmp_path) -> None:
    _write_npy_folder(tmp_path, {**NYU, "depth": (288, 380, 1)}, {"train": 1, "val": 1})
    with pytest.raises(DataError, match=r"depth/0.npy: shape \(288, 380, 1\), expected"):
        load_dataset("nyuv2", {"path": str(tmp_path), "check_counts": False}, seed=0)
    with pytest.raises(DataError, match="missing folder"):
        load_dataset("cityscapes", {"path": str(tmp_path), "check_counts": False}, seed=0)


def test_cityscapes_loader_7_and_19_classes(tmp_path) -> None:
    layout = {
        "image": (128, 256, 3),
        "label_7": (128, 256),
        "label_19": (128, 256),
        "depth": (128, 256, 1),
    }
    _write_npy_folder(tmp_path, layout, {"train": 2, "val": 1})
    for classes in (7, 19):
        params = {"path": str(tmp_path), "classes": classes, "check_counts": False}
        table = load_dataset("cityscapes", params, seed=0)
        assert [t.name for t in table.tasks] == ["segment", "depth"]
        assert table.tasks[0].num_classes == classes
        assert table.targets["segment"].max() == classes - 1
    with pytest.raises(ConfigError, match="classes must be 7 or 19"):
        load_dataset("cityscapes", {"path": str(tmp_path), "classes": 8}, seed=0)


def test_dense_mtan_attends_per_task_and_trains(tmp_path) -> None:
    tasks = [TaskSpec("seg", "segmentation", num_classes=3), TaskSpec("d", "depth")]
    model = build_model(
        tasks,
        (3, 10, 14),
        encoder="dense_cnn",
        head="dense",
        architecture="dense_mtan",
        encoder_params={"channels": [4, 6, 8], "out_features": 4},
    )
    out = model(torch.randn(2, 3, 10, 14))
    assert out.outputs["seg"].shape == (2, 3, 10, 14) and out.outputs["d"].shape == (2, 1, 10, 14)
    out.outputs["seg"].sum().backward()
    seg_branch = model.branches["seg"].masks[0][0].weight  # type: ignore[index]
    depth_branch = model.branches["d"].masks[0][0].weight  # type: ignore[index]
    assert seg_branch.grad is not None and seg_branch.grad.abs().sum() > 0
    assert depth_branch.grad is None  # the depth branch is its own task's
    shared = {id(p) for p in model.shared_parameters()}
    assert id(seg_branch) not in shared and shared
    with pytest.raises(ConfigError, match="dense_mtan needs the dense_cnn encoder"):
        build_model(tasks, (3, 8, 8), encoder="cnn", head="dense", architecture="dense_mtan")
    raw = _dense_run(tmp_path, num_samples=60, batch_size=20, width=4, epochs=2)
    raw["model"]["architecture"] = "dense_mtan"
    result = train_run(parse_config(raw), run_dir=tmp_path / "run")
    assert np.isfinite(result.test["normal"]["mean_angle"])


def test_depth_scale_standardises_the_loss_and_decodes_to_the_labels_units() -> None:
    """Fitted on valid pixels only (holes and NaN left out); the loss is L1 against the
    standardised depth (the raw L1 divided by std) and ``decode`` gives the labels' units."""
    from polytask.dense_tasks import depth_target_scale

    rng = np.random.default_rng(4)
    truth = rng.uniform(1.0, 3.0, (5, 1, 6, 7)).astype(np.float32)
    truth[rng.random(truth.shape) < 0.2] = 0.0
    truth[1, 0, 2, 3] = np.nan
    valid = np.isfinite(truth) & (np.nan_to_num(truth) > 0)
    mean, std = depth_target_scale(torch.from_numpy(truth), chunk=2)
    assert float(mean) == pytest.approx(truth[valid].mean(), rel=1e-6)
    assert float(std) == pytest.approx(truth[valid].std(), rel=1e-5)
    task = TaskSpec("depth", "depth").with_target_scale(mean, std)
    prediction = torch.from_numpy(rng.uniform(1.0, 3.0, truth.shape).astype(np.float32))
    head = (prediction - float(mean)) / float(std)  # what the head outputs for that prediction
    loss, count = task.compute_loss(head, torch.from_numpy(truth))
    raw_l1 = np.abs(prediction.numpy() - np.nan_to_num(truth))[valid].mean()
    assert int(count) == valid.sum()
    assert float(loss) == pytest.approx(raw_l1 / float(std), rel=1e-5)
    np.testing.assert_allclose(task.decode(head).numpy(), prediction.numpy(), rtol=1e-5)
    got = _feed(task, [(head, torch.from_numpy(truth))])  # metrics in the labels' units
    assert got["abs_err"] == pytest.approx(raw_l1, rel=1e-5)
    assert TaskSpec.from_dict(task.to_dict()) == task
