"""The ``celeba`` dataset on a small folder in CelebA's official layout, and the refusal of
per-pixel task kinds for table columns."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from polytask.cli import app
from polytask.config import parse_config
from polytask.data.sources import DATASETS, load_dataset
from polytask.errors import ConfigError, DataError
from polytask.run import train_run

#: the 40 attributes of list_attr_celeba.txt, in the file's order
ATTRIBUTES = [
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs",
    "Big_Lips", "Big_Nose", "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair", "Bushy_Eyebrows",
    "Chubby", "Double_Chin", "Eyeglasses", "Goatee", "Gray_Hair", "Heavy_Makeup",
    "High_Cheekbones", "Male", "Mouth_Slightly_Open", "Mustache", "Narrow_Eyes", "No_Beard",
    "Oval_Face", "Pale_Skin", "Pointy_Nose", "Receding_Hairline", "Rosy_Cheeks", "Sideburns",
    "Smiling", "Straight_Hair", "Wavy_Hair", "Wearing_Earrings", "Wearing_Hat",
    "Wearing_Lipstick", "Wearing_Necklace", "Wearing_Necktie", "Young",
]  # fmt: skip
NUM_IMAGES = 30
#: split code per image: 0 train (18), 1 val (6), 2 test (6), interleaved
SPLIT = np.array([0, 0, 1, 0, 2] * 6, dtype=np.int8)


def _colour(i: int) -> tuple[int, int, int]:
    return (8 * i, 255 - 8 * i, 128)


def _write_celeba(root: Path) -> np.ndarray:
    """A CelebA folder of NUM_IMAGES solid-colour 178×218 JPEGs in the official layout; returns
    the attribute values (1/-1) written, ``[NUM_IMAGES, 40]``."""
    rng = np.random.default_rng(0)
    values = rng.choice([-1, 1], size=(NUM_IMAGES, len(ATTRIBUTES)))
    (root / "img_align_celeba").mkdir(parents=True)
    rows = []
    for i in range(NUM_IMAGES):
        name = f"{i + 1:06d}.jpg"
        Image.new("RGB", (178, 218), _colour(i)).save(root / "img_align_celeba" / name)
        rows.append(name + " " + " ".join(f"{v:2d}" for v in values[i]))
    header = [str(NUM_IMAGES), " ".join(ATTRIBUTES) + " "]
    (root / "list_attr_celeba.txt").write_text("\n".join(header + rows) + "\n")
    partition = [f"{i + 1:06d}.jpg {SPLIT[i]}" for i in reversed(range(NUM_IMAGES))]
    (root / "list_eval_partition.txt").write_text("\n".join(partition) + "\n")
    return values


@pytest.fixture
def celeba_folder(tmp_path: Path) -> tuple[Path, np.ndarray]:
    root = tmp_path / "celeba"
    return root, _write_celeba(root)


def _load(root: Path, **params: object):
    return load_dataset("celeba", {"path": str(root), "check_counts": False, **params}, seed=0)


def test_reads_tasks_labels_splits_and_images(celeba_folder) -> None:
    root, values = celeba_folder
    table = _load(root, size=[8, 6], normalize=False)
    table.validate()
    assert [t.name for t in table.tasks] == ATTRIBUTES
    assert {t.kind for t in table.tasks} == {"binary"}
    for j, name in enumerate(ATTRIBUTES):
        assert np.array_equal(table.targets[name], (values[:, j] == 1).astype(np.float32))
    assert np.array_equal(table.split, SPLIT)  # matched by file name, not by line
    assert table.inputs.shape == (NUM_IMAGES, 3, 8, 6) and table.inputs.dtype == np.float32
    expected = np.array([_colour(i) for i in range(NUM_IMAGES)], dtype=np.float32) / 255
    assert np.abs(table.inputs.mean(axis=(2, 3)) - expected).max() < 0.02  # JPEG is lossy
    assert table.preprocessors == {}
    assert "channel_norm" in str(_load(root, size=[8, 8]).preprocessors[""].to_dict())


def test_attribute_subset_and_unknown_names(celeba_folder) -> None:
    root, values = celeba_folder
    table = _load(root, size=[4, 4], attributes=["Smiling", "5_o_Clock_Shadow"])
    assert [t.name for t in table.tasks] == ["Smiling", "5_o_Clock_Shadow"]
    smiling = ATTRIBUTES.index("Smiling")
    assert np.array_equal(table.targets["Smiling"], (values[:, smiling] == 1).astype(np.float32))
    with pytest.raises(ConfigError, match=r"unknown attribute\(s\) Happy, Tall; known: 5_o_Cl"):
        _load(root, attributes=["Smiling", "Happy", "Tall"])
    with pytest.raises(ConfigError, match="non-empty list"):
        _load(root, attributes=[])


def test_limit_keeps_the_first_images_of_each_split(celeba_folder) -> None:
    root, _ = celeba_folder
    table = _load(root, size=[4, 4], limit=2, normalize=False)
    assert np.array_equal(table.split, [0, 0, 1, 2, 1, 2])
    first = np.array([_colour(i) for i in (0, 1, 2, 4, 7, 9)], dtype=np.float32) / 255
    assert np.abs(table.inputs.mean(axis=(2, 3)) - first).max() < 0.02
    half = _load(root, size=[4, 4], limit=0.5)
    assert np.bincount(half.split).tolist() == [9, 3, 3]
    for bad in (0, 1.5, -0.1, True):
        with pytest.raises(ConfigError, match="limit must be an integer >= 1"):
            _load(root, limit=bad)


def test_the_release_subfolders_are_found_too(celeba_folder) -> None:
    root, _ = celeba_folder
    flat = _load(root, size=[4, 4])
    for name, sub in [("img_align_celeba", "Img"), ("list_attr_celeba.txt", "Anno"),
                      ("list_eval_partition.txt", "Eval")]:  # fmt: skip
        (root / sub).mkdir()
        (root / name).rename(root / sub / name)
    released = _load(root, size=[4, 4])
    assert np.array_equal(released.inputs, flat.inputs)
    assert np.array_equal(released.split, flat.split)
    assert all(np.array_equal(released.targets[a], flat.targets[a]) for a in ATTRIBUTES)


def test_official_counts_are_checked_unless_disabled(celeba_folder) -> None:
    root, _ = celeba_folder
    with pytest.raises(
        DataError, match=r"list_eval_partition.txt: 18 train images, expected 162,770"
    ):
        load_dataset("celeba", {"path": str(root)}, seed=0)
    assert len(_load(root, size=[4, 4])) == NUM_IMAGES


def _replace_line(path: Path, number: int, line: str) -> None:
    lines = path.read_text().splitlines()
    lines[number - 1] = line
    path.write_text("\n".join(lines) + "\n")


def _bad_header(root: Path) -> None:
    _replace_line(root / "list_attr_celeba.txt", 2, " ".join(ATTRIBUTES[:39]))


def _short_row(root: Path) -> None:
    _replace_line(root / "list_attr_celeba.txt", 5, "000003.jpg" + " 1" * 39)


def _bad_value(root: Path) -> None:
    _replace_line(root / "list_attr_celeba.txt", 4, "000002.jpg" + " -1" * 4 + " 0" + " 1" * 35)


def _bad_count(root: Path) -> None:
    _replace_line(root / "list_attr_celeba.txt", 1, "31")


def _no_count(root: Path) -> None:
    _replace_line(root / "list_attr_celeba.txt", 1, "images")


def _missing_image(root: Path) -> None:
    (root / "img_align_celeba" / "000007.jpg").unlink()


def _unlabelled_file(root: Path) -> None:
    with (root / "list_eval_partition.txt").open("a") as f:
        f.write("000031.jpg 0\n")


def _unsplit_file(root: Path) -> None:
    path = root / "list_eval_partition.txt"
    path.write_text("\n".join(path.read_text().splitlines()[1:]) + "\n")  # 000030.jpg's line


def _bad_partition(root: Path) -> None:
    _replace_line(root / "list_eval_partition.txt", 2, "000029.jpg 3")


def _twice_listed(root: Path) -> None:
    _replace_line(root / "list_eval_partition.txt", 2, "000030.jpg 0")


def _no_folder(root: Path) -> None:
    (root / "img_align_celeba").rename(root / "images")


def _no_attributes(root: Path) -> None:
    (root / "list_attr_celeba.txt").unlink()


def _no_partition(root: Path) -> None:
    (root / "list_eval_partition.txt").unlink()


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_no_folder, r"celeba: missing folder \S+/img_align_celeba \(or \S+/Img/img_align_c"),
        (_no_attributes, r"celeba: missing file \S+/list_attr_celeba.txt \(or \S+/Anno/list_attr"),
        (_no_partition, r"celeba: missing file \S+/list_eval_partition.txt \(or \S+/Eval/list_"),
        (_bad_header, r"list_attr_celeba.txt: line 2 must name the 40 attributes, found 39"),
        (_short_row, r"list_attr_celeba.txt: line 5: 39 values after the file name, expected 40"),
        (_bad_value, r"list_attr_celeba.txt: line 4, attribute 'Bald': value '0' must be 1 or -1"),
        (_bad_count, r"list_attr_celeba.txt: line 1 says 31 images, found 30 lines"),
        (_no_count, r"list_attr_celeba.txt: line 1 must be the number of images, found 'images'"),
        (_missing_image, r"celeba/000007.jpg: listed in list_attr_celeba.txt but missing"),
        (_unlabelled_file, r"list_eval_partition.txt: 1 file\(s\) not in list_attr_celeba.txt, "
                           r"the first 000031.jpg"),
        (_unsplit_file, r"list_attr_celeba.txt: 1 file\(s\) not in list_eval_partition.txt, "
                        r"the first 000030.jpg"),
        (_bad_partition, r"list_eval_partition.txt: line 2: expected '<file> <0\|1\|2>', found "
                         r"'000029.jpg 3'"),
        (_twice_listed, r"list_eval_partition.txt: line 2: 000030.jpg is listed twice"),
    ],
)  # fmt: skip
def test_malformed_folders_get_one_line_naming_the_file(celeba_folder, damage, message) -> None:
    root, _ = celeba_folder
    damage(root)
    with pytest.raises(DataError, match=message) as caught:
        _load(root, size=[4, 4])
    assert "\n" not in str(caught.value)


def test_a_missing_folder_is_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"celeba: \S+/nowhere is not a folder"):
        _load(tmp_path / "nowhere")


def test_trains_end_to_end_from_the_cli(celeba_folder, tmp_path: Path) -> None:
    root, _ = celeba_folder
    config = {
        "name": "celeba-tiny",
        "output_dir": str(tmp_path / "runs"),
        "data": {
            "dataset": "celeba",
            "params": {"path": str(root), "size": [16, 16], "check_counts": False},
            "batch_size": 8,
        },
        "model": {"encoder": "cnn", "encoder_params": {"channels": [4], "out_features": 8}},
        "train": {"epochs": 1, "progress": False},
    }
    path = tmp_path / "celeba.yaml"
    path.write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(app, ["train", str(path), "--no-progress"])
    assert result.exit_code == 0, result.output
    (run,) = (tmp_path / "runs").iterdir()
    test = json.loads((run / "results.json").read_text())["test"]
    assert set(test) >= set(ATTRIBUTES)
    assert 0.0 <= test["Smiling"]["accuracy"] <= 1.0

    del config["data"]["params"]["check_counts"]  # the default refuses a folder of 30 images
    path.write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(app, ["train", str(path), "--no-progress"])
    assert result.exit_code == 1
    assert "error:" in result.output and "expected 162,770" in result.output


@pytest.mark.parametrize("normalize", [True, False])
def test_streamed_celeba_trains_what_the_in_memory_one_trains(
    celeba_folder, tmp_path: Path, normalize: bool
) -> None:
    """``data.streaming`` reads the same rows, labels, split and channel statistics (or, with
    ``normalize: false``, the same per-pixel standardisation): the weights end equal."""
    root, _ = celeba_folder
    params = {"path": str(root), "size": [16, 16], "check_counts": False, "normalize": normalize}
    raw = {
        "name": "celeba-stream",
        "data": {"dataset": "celeba", "params": params, "batch_size": 8},
        "model": {"encoder": "cnn", "encoder_params": {"channels": [4], "out_features": 8}},
        "train": {"epochs": 2, "progress": False},
    }
    memory = train_run(parse_config(raw), run_dir=tmp_path / "memory")
    raw["data"]["streaming"] = {"workers": 0}
    streamed = train_run(parse_config(raw), run_dir=tmp_path / "streamed")
    a, b = (
        load_file(str(tmp_path / r / "checkpoints" / "last.safetensors"))
        for r in ("memory", "streamed")
    )
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert streamed.test == memory.test
    saved = json.loads((tmp_path / "streamed" / "run.json").read_text())
    assert saved["data"]["streaming"] is True


# ----------------------------------------------------------------------------- table columns
@pytest.mark.parametrize(
    ("kind", "num_classes"), [("segmentation", 3), ("depth", 1), ("normals", 3)]
)
def test_table_columns_refuse_per_pixel_kinds(tmp_path: Path, kind: str, num_classes: int) -> None:
    csv = tmp_path / "data.csv"
    csv.write_text("x,y\n0.5,1\n0.25,0\n")
    tasks = [{"name": "y", "kind": kind, "num_classes": num_classes}]
    with pytest.raises(ConfigError) as caught:
        DATASETS.get("file")(seed=0, path=str(csv), tasks=tasks)
    message = str(caught.value)
    assert message.startswith(f"{csv}: task 'y': kind '{kind}' needs per-pixel targets")
    assert "nyuv2" in message and "\n" not in message
