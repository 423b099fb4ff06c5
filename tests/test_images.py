"""Images: files read with Pillow, image-folder, channel normalisation, train-time
augmentation and the augmented encoder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from polytask.cli import app
from polytask.data.bundle import build_bundle
from polytask.data.images import ChannelNormalizer, load_image
from polytask.data.sources import DATASETS
from polytask.errors import ConfigError, DataError
from polytask.models import build_model
from polytask.models.augment import ImageAugment
from polytask.models.encoders import CNNEncoder
from polytask.models.fusion import AugmentedEncoder
from polytask.tasks import TaskSpec

TASKS = [
    {"name": "shape", "kind": "multiclass", "num_classes": 2},
    {"name": "bright", "kind": "binary"},
]


def _folder(tmp_path: Path, n: int = 12) -> Path:
    """``n`` images (alternately a bright square or a dark bar, PNG and JPEG) and labels.csv."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        image = Image.new("RGB", (12, 10), (0, 0, 0))
        value = 250 if i % 3 else 90
        for x in range(3, 9):
            for y in range(2, 8) if i % 2 == 0 else range(4, 6):
                image.putpixel((x, y), (value, value // 2, 0))
        name = f"img{i}.{'png' if i % 2 else 'jpg'}"
        image.save(tmp_path / name)
        bright = "" if i == 4 else str(int(i % 3 != 0))
        rows.append(f"{name},{i % 2},{bright}")
    (tmp_path / "labels.csv").write_text("file,shape,bright\n" + "\n".join(rows) + "\n")
    return tmp_path


def test_load_image_converts_and_resizes(tmp_path: Path) -> None:
    Image.new("RGB", (20, 10), (255, 128, 0)).save(tmp_path / "a.png")
    rgb = load_image(tmp_path / "a.png", size=(5, 8), mode="RGB")
    assert rgb.shape == (3, 5, 8) and rgb.dtype == np.float32
    assert np.allclose(rgb[:, 2, 3], [1.0, 128 / 255, 0.0], atol=1e-6)
    gray = load_image(tmp_path / "a.png", size=(4, 4), mode="L")
    assert gray.shape == (1, 4, 4) and 0.0 < gray.max() < 1.0


def test_bad_images_name_the_file(tmp_path: Path) -> None:
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match=r"broken\.png: not a readable image"):
        load_image(tmp_path / "broken.png", size=(4, 4))
    with pytest.raises(DataError, match=r"missing\.jpg: no such image file"):
        load_image(tmp_path / "missing.jpg", size=(4, 4))
    with pytest.raises(ConfigError, match="image mode"):
        load_image(tmp_path / "broken.png", size=(4, 4), mode="CMYK")


def test_image_folder_reads_labels_and_normalises_on_train(tmp_path: Path) -> None:
    folder = _folder(tmp_path)
    table = DATASETS.get("image-folder")(
        seed=0, path=str(folder), tasks=TASKS, size=[8, 8], mode="RGB"
    )
    assert table.inputs.shape == (12, 3, 8, 8)
    assert table.targets["shape"].tolist() == [0, 1] * 6
    assert np.isnan(table.targets["bright"][4])
    bundle = build_bundle(table, val_fraction=0.25, test_fraction=0.25, seed=0)
    norm = bundle.preprocessors[""]
    assert isinstance(norm, ChannelNormalizer) and bundle.input_shape == (3, 8, 8)
    train_rows = [i for i in range(12) if i not in _split_rows(bundle)]
    expected = table.inputs[train_rows].mean(axis=(0, 2, 3))
    assert np.allclose(norm.mean, expected, atol=1e-6)  # fitted on the training images only
    assert torch.allclose(bundle.train.inputs.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)


def _split_rows(bundle) -> set[int]:
    from polytask.data.bundle import split_indices

    parts = split_indices(12, val_fraction=0.25, test_fraction=0.25, seed=0)
    return set(parts["val"].tolist()) | set(parts["test"].tolist())


def test_image_folder_errors_name_the_file_or_column(tmp_path: Path) -> None:
    folder = _folder(tmp_path, n=4)
    (folder / "img2.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match=r"img2\.jpg: not a readable image"):
        DATASETS.get("image-folder")(seed=0, path=str(folder), tasks=TASKS)
    with pytest.raises(DataError, match=r"labels\.csv: no column 'path'"):
        DATASETS.get("image-folder")(seed=0, path=str(folder), tasks=TASKS, file_column="path")
    with pytest.raises(DataError, match="no such folder"):
        DATASETS.get("image-folder")(seed=0, path=str(folder / "nope"), tasks=TASKS)


def test_channel_normalizer_round_trips() -> None:
    n = ChannelNormalizer()
    x = np.random.default_rng(0).random((5, 3, 4, 4))
    n.fit(x)
    again = ChannelNormalizer.from_dict(n.to_dict())
    assert torch.equal(again.transform(x), n.transform(x))


# ----------------------------------------------------------------------------- augmentation
def test_augment_is_identity_in_evaluation_mode() -> None:
    aug = ImageAugment(crop_padding=2, flip=0.5, rotate=15, scale=0.1, translate=0.1).eval()
    x = torch.rand(6, 3, 8, 8)
    assert torch.equal(aug(x), x)


def test_random_crop_is_an_integer_shift_with_zero_fill() -> None:
    torch.manual_seed(0)
    aug = ImageAugment(crop_padding=2)
    x = torch.rand(16, 1, 6, 6) + 1.0  # no zeros inside the image
    out = aug(x)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    shifts = set()
    for b in range(16):
        matches = [
            (dy, dx)
            for dy in range(5)
            for dx in range(5)
            if torch.equal(out[b], padded[b, :, dy : dy + 6, dx : dx + 6])
        ]
        assert matches, f"sample {b} is not a crop of the padded image"
        shifts.add(matches[0])
    assert len(shifts) > 3  # samples are shifted independently


def test_flip_and_affine() -> None:
    x = torch.rand(4, 2, 5, 7)
    assert torch.equal(ImageAugment(flip=1.0)(x), x.flip(-1))
    torch.manual_seed(1)
    out = ImageAugment(rotate=20.0, scale=0.1)(x)
    assert out.shape == x.shape and not torch.allclose(out, x)
    assert torch.allclose(ImageAugment(rotate=0.0)(x), x)
    with pytest.raises(ConfigError, match=r"flip .* must be in"):
        ImageAugment(flip=2.0)


def test_augmented_encoder_augments_training_batches_only() -> None:
    torch.manual_seed(0)
    enc = AugmentedEncoder(
        (1, 8, 8),
        encoder={"name": "cnn", "params": {"channels": [4], "out_features": 6}},
        augment={"crop_padding": 2, "flip": 0.5},
    )
    x = torch.rand(5, 1, 8, 8)
    enc.train()
    out = enc(x)
    assert out.shape == (5, 6) and enc.out_features == 6
    out.sum().backward()
    assert all(p.grad is not None for p in enc.parameters())
    enc.eval()
    inner = enc.encoder
    assert isinstance(inner, CNNEncoder) and torch.equal(enc(x), inner(x))
    enc.train()
    torch.manual_seed(3)
    a = enc.augment(x)
    assert not torch.equal(a, x)


def test_augmented_encoder_errors() -> None:
    with pytest.raises(ConfigError, match=r"augmented\.augment: unknown option"):
        AugmentedEncoder((1, 8, 8), encoder={"name": "cnn"}, augment={"mixup": 0.2})
    with pytest.raises(ConfigError, match=r"augmented\.encoder: unknown encoder 'vit'"):
        AugmentedEncoder((1, 8, 8), encoder={"name": "vit"})
    with pytest.raises(ConfigError, match=r"augmented\.encoder: unknown parameter 'width'"):
        AugmentedEncoder((1, 8, 8), encoder={"name": "cnn", "params": {"width": 3}})
    with pytest.raises(ConfigError, match="needs images"):
        AugmentedEncoder((8,), encoder={"name": "mlp"})


@pytest.mark.parametrize("architecture", ["hard_sharing", "mmoe"])
def test_augmented_encoder_in_architectures(architecture: str) -> None:
    tasks = [TaskSpec("a", "multiclass", num_classes=3), TaskSpec("b", "regression")]
    model = build_model(
        tasks,
        (1, 8, 8),
        encoder="augmented",
        encoder_params={
            "encoder": {"name": "cnn", "params": {"channels": [4]}},
            "augment": {"flip": 0.5},
        },
        architecture=architecture,
    )
    out = model(torch.rand(3, 1, 8, 8))
    assert out.outputs["a"].shape == (3, 3)


def test_image_folder_trains_from_the_cli(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "data")
    config = {
        "name": "images",
        "output_dir": str(tmp_path / "runs"),
        "data": {
            "dataset": "image-folder",
            "params": {"path": str(folder), "tasks": TASKS, "size": [8, 8]},
            "batch_size": 4,
        },
        "model": {
            "encoder": "augmented",
            "encoder_params": {
                "encoder": {"name": "cnn", "params": {"channels": [4], "out_features": 8}},
                "augment": {"crop_padding": 1, "rotate": 10},
            },
        },
        "train": {"epochs": 1, "progress": False},
    }
    path = tmp_path / "images.yaml"
    path.write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(app, ["train", str(path), "--no-progress"])
    assert result.exit_code == 0, result.output
