"""``data.streaming`` from a run's configuration: every streamable kind (image, audio and dense
folders, CSV, Parquet) trains to the very parameters and metrics of the in-memory path, a
streamed run resumed after an interruption equals an uninterrupted one, DDP shares are disjoint
and complete (and 2 gloo processes train what one process with twice the batch trains), and a
dataset that cannot stream is one error line."""

from __future__ import annotations

import copy
import gc
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist
import yaml
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from cli_checks import one_error_line as _one_error_line
from polytask.cli import app
from polytask.config import parse_config
from polytask.data.audio import tone, write_wav
from polytask.data.streaming import StreamedSplit
from polytask.errors import DataError
from polytask.run import resume_run, train_run
from polytask.run.data import build_data, train_batches
from processes import free_port, run_processes

IMAGE_TASKS = [
    {"name": "digit", "kind": "multiclass", "num_classes": 3},
    {"name": "bright", "kind": "binary"},
]
TABLE_TASKS = [{"name": "y", "kind": "regression"}, {"name": "b", "kind": "binary"}]


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One small folder or file of every streamable kind."""
    root = tmp_path_factory.mktemp("streamable")
    rng = np.random.default_rng(0)
    images = root / "images"
    images.mkdir()
    rows = []
    for i in range(37):  # a prime count: ragged last batches
        pixels = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / f"im{i:02d}.png")
        rows.append(f"im{i:02d}.png,{i % 3},{'' if i == 5 else int(pixels.mean() > 127)}")
    (images / "labels.csv").write_text("file,digit,bright\n" + "\n".join(rows) + "\n")
    audio = root / "audio"
    audio.mkdir()
    rows = []
    for i in range(24):
        wave = (0.2 + 0.02 * i) * tone(300 + 40 * i, seconds=0.02 + 0.002 * i, sample_rate=4000)
        write_wav(audio / f"a{i:02d}.wav", wave, 4000)
        rows.append(f"a{i:02d}.wav,{int(i >= 12)}")
    (audio / "labels.csv").write_text("file,high\n" + "\n".join(rows) + "\n")
    dense = root / "nyuv2"
    shapes = {"image": (288, 384, 3), "label": (288, 384), "depth": (288, 384, 1)}
    shapes["normal"] = (288, 384, 3)
    for part, n in (("train", 4), ("val", 1)):
        for folder, shape in shapes.items():
            (dense / part / folder).mkdir(parents=True)
            for i in range(n):
                if folder == "label":
                    array = rng.integers(-1, 13, shape).astype(np.float32)
                else:
                    array = rng.random(shape, dtype=np.float32)
                np.save(dense / part / folder / f"{i}.npy", array)
    x = rng.normal(size=(150, 4)) * [1.0, 10.0, 0.1, 1.0] + [0.0, 1e3, 0.0, -5.0]
    frame = pd.DataFrame(x, columns=["f1", "f2", "f3", "f4"])
    frame["y"] = x[:, 0] - 0.01 * x[:, 1] + rng.normal(scale=0.1, size=150)
    frame["b"] = (x[:, 2] > 0).astype(float)
    frame.loc[[3, 70], "b"] = np.nan  # missing labels
    frame.to_csv(root / "table.csv", index=False)
    frame.to_parquet(root / "table.parquet", index=False)
    return {
        "image": images,
        "audio": audio,
        "nyuv2": dense,
        "csv": root / "table.csv",
        "parquet": root / "table.parquet",
    }


def _config(kind: str, folders: dict[str, Path], out: Path) -> dict[str, Any]:
    """A seconds-long run on the ``kind`` data (in memory; the tests add ``data.streaming``)."""
    model: dict[str, Any] = {"encoder": "mlp", "encoder_params": {"hidden": [8]}}
    data: dict[str, Any] = {"batch_size": 8}
    if kind == "image":
        params = {"path": str(folders["image"]), "tasks": IMAGE_TASKS, "size": [8, 8]}
        data |= {"dataset": "image-folder", "params": params | {"mode": "RGB"}}
        model = {"encoder": "cnn", "encoder_params": {"channels": [4], "out_features": 8}}
        model["encoder_params"]["dropout"] = 0.2  # the run's random stream must match too
    elif kind == "audio":
        tasks = [{"name": "high", "kind": "binary"}]
        params = {"path": str(folders["audio"]), "tasks": tasks, "sample_rate": 2000}
        data |= {"dataset": "audio-folder", "params": params | {"seconds": 0.05}}
        model["encoder"] = "audio_cnn"
        model["encoder_params"] = {"n_mels": 8, "channels": [4], "out_features": 8}
    elif kind == "nyuv2":
        params = {"path": str(folders["nyuv2"]), "check_counts": False, "val_fraction": 0.25}
        data |= {"dataset": "nyuv2", "params": params, "batch_size": 2}
        model = {"encoder": "dense_cnn", "head": "dense", "head_params": {"hidden": 4}}
        model["encoder_params"] = {"channels": [4, 4, 4], "out_features": 4}
    else:
        params = {"path": str(folders[kind]), "tasks": TABLE_TASKS}
        data |= {"dataset": "file", "params": params}
    return {
        "name": kind,
        "seed": 0,
        "output_dir": str(out),
        "data": data,
        "model": model,
        "optimizer": {"name": "adamw", "lr": 0.01},
        "train": {"epochs": 2, "progress": False},
    }


def _weights(run_dir: Path, name: str = "last") -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "checkpoints" / f"{name}.safetensors"))


def _records(run_dir: Path) -> list[dict[str, Any]]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for record in records:
        for key in ("time_s", "train_time_s", "data_wait_fraction"):
            record.pop(key, None)
    return records


def _streaming(raw: dict[str, Any], **settings: Any) -> dict[str, Any]:
    """``raw`` with ``data.streaming`` set (CSV/Parquet files converted 40 rows at a time, so
    the tiny files are read in several chunks)."""
    raw = copy.deepcopy(raw)
    raw["data"]["streaming"] = {"workers": 0, "chunk_rows": 40} | settings
    return raw


@pytest.mark.parametrize("kind", ["image", "audio", "nyuv2", "csv", "parquet"])
def test_streamed_training_equals_in_memory_training(
    kind: str, folders: dict[str, Path], tmp_path: Path
) -> None:
    """Same seed, same parameters and metrics: the splits, batches, order, input statistics and
    the run's random stream (initialisation, dropout) are the in-memory path's."""
    raw = _config(kind, folders, tmp_path)
    memory = train_run(parse_config(raw), run_dir=tmp_path / "memory")
    workers = 2 if kind == "image" else 0  # worker processes once; the others read in-process
    streamed = train_run(
        parse_config(_streaming(raw, workers=workers)), run_dir=tmp_path / "streamed"
    )
    a, b = _weights(tmp_path / "memory"), _weights(tmp_path / "streamed")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert streamed.test == memory.test
    saved = json.loads((tmp_path / "streamed" / "run.json").read_text())
    before = json.loads((tmp_path / "memory" / "run.json").read_text())
    assert saved["data"]["streaming"] is True
    for key in ("input_shape", "tasks", "preprocessors", "feature_names"):
        assert saved[key] == before[key], key
    fingerprints = [run["data"]["datasets"][0]["fingerprint"] for run in (saved, before)]
    assert fingerprints[0] == fingerprints[1]


def test_a_streamed_run_resumed_after_an_interruption_equals_an_uninterrupted_one(
    folders: dict[str, Path], tmp_path: Path
) -> None:
    """Two worker processes, dropout in the encoder, stopped after epoch 1 of 2 and resumed by
    a fresh ``resume_run`` reading in the training process: the same records and weights."""

    class Interrupt(Exception):
        pass

    def stop(record: dict[str, Any]) -> None:
        if record["epoch"] == 1:
            raise Interrupt

    raw = _streaming(_config("image", folders, tmp_path), workers=2)
    full = train_run(parse_config(raw), run_dir=tmp_path / "full")
    with pytest.raises(Interrupt):
        train_run(parse_config(raw), run_dir=tmp_path / "cut", callbacks=[stop])
    edited = yaml.safe_load((tmp_path / "cut" / "config.yaml").read_text())
    edited["data"]["streaming"]["workers"] = 0  # how the data is read may change on resume
    (tmp_path / "cut" / "config.yaml").write_text(yaml.safe_dump(edited))
    resumed = resume_run(tmp_path / "cut", progress=False)
    assert resumed.test == full.test
    assert _records(tmp_path / "cut") == _records(tmp_path / "full")
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_ddp_shares_of_a_streamed_split_are_disjoint_and_complete(
    folders: dict[str, Path], tmp_path: Path
) -> None:
    """Each global batch of 2 × 8 rows is split into two disjoint shares whose union is the
    batch one process with batch 16 reads (rows told apart by their unique label ``y``)."""
    raw = _streaming(_config("csv", folders, tmp_path))
    config = parse_config(raw)
    bundle = build_data(config)
    assert isinstance(bundle.train, StreamedSplit)
    shares = [train_batches(config, bundle, rank=r, world_size=2) for r in (0, 1)]
    whole = train_batches(
        parse_config(raw | {"data": raw["data"] | {"batch_size": 16}}), bundle, rank=0,
        world_size=1,
    )  # fmt: skip
    for source in (*shares, whole):
        source.set_epoch(1)
    seen: list[float] = []
    for (_, first), (_, second), (_, both) in zip(*shares, whole, strict=True):
        a, b = first["y"].tolist(), second["y"].tolist()
        assert not set(a) & set(b)
        assert a + b == both["y"].tolist()
        seen += a + b
    assert sorted(seen) == sorted(bundle.train.targets["y"].tolist())  # the whole epoch


def _ddp_worker(rank: int, port: int, raw: dict[str, Any], run_dir: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
        WORLD_SIZE="2",
    )  # fmt: skip
    torch.set_num_threads(1)
    train_run(parse_config(raw), run_dir=Path(run_dir))
    dist.destroy_process_group()


def test_two_gloo_processes_streaming_train_what_one_process_with_twice_the_batch_trains(
    folders: dict[str, Path], tmp_path: Path
) -> None:
    raw = _streaming(_config("parquet", folders, tmp_path))
    raw["train"]["epochs"] = 1
    # forked, not spawned: the children need not import torch again (seconds on a small machine)
    run_processes(_ddp_worker, (free_port(), raw, str(tmp_path / "ddp")), start_method="fork")
    raw["data"]["batch_size"] = 16
    train_run(parse_config(raw), run_dir=tmp_path / "one")
    ddp, one = _records(tmp_path / "ddp"), _records(tmp_path / "one")
    assert [r["step"] for r in ddp] == [r["step"] for r in one]
    for r, s in zip(ddp, one, strict=True):
        assert r["train"]["y"]["loss"] == pytest.approx(s["train"]["y"]["loss"], rel=1e-4)
    a, b = _weights(tmp_path / "ddp"), _weights(tmp_path / "one")
    assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)


def _cli(*args: object) -> Any:
    return CliRunner().invoke(app, [str(a) for a in args])


def test_polytask_train_streams_from_the_yaml(folders: dict[str, Path], tmp_path: Path) -> None:
    raw = _streaming(_config("csv", folders, tmp_path / "runs"))
    raw["data"]["streaming"]["cache_dir"] = str(tmp_path / "cache")
    path = tmp_path / "stream.yaml"
    path.write_text(yaml.safe_dump(raw))
    result = _cli("train", path, "train.epochs=1")
    assert result.exit_code == 0, result.output
    gc.collect()
    assert list((tmp_path / "cache").iterdir()) == []  # the feature copy ends with the run
    saved = json.loads((tmp_path / "runs" / "csv" / "run.json").read_text())
    assert saved["data"]["streaming"] is True and saved["data"]["sizes"]["train"] == 106
    evaluated = _cli("evaluate", tmp_path / "runs" / "csv")  # reads the test split streamed
    assert evaluated.exit_code == 0, evaluated.output
    results = json.loads((tmp_path / "runs" / "csv" / "results.json").read_text())
    assert f"{results['test']['y']['rmse']:.4f}" in evaluated.output


def test_what_cannot_stream_is_one_error_line(
    folders: dict[str, Path], tmp_path: Path, tiny_yaml: Path
) -> None:
    line = _one_error_line(_cli("train", tiny_yaml, "data.streaming.workers=0"))
    assert "data.streaming: dataset 'mmoe-synthetic' cannot be streamed" in line
    assert "streamable: audio-folder, celeba, cityscapes, file, image-folder, nyuv2" in line
    raw = _streaming(_config("audio", folders, tmp_path))
    del raw["data"]["params"]["seconds"]
    path = tmp_path / "audio.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert "data.params.seconds: a streamed audio-folder needs" in _one_error_line(
        _cli("train", path)
    )
    path = tmp_path / "csv.yaml"
    path.write_text(yaml.safe_dump(_streaming(_config("csv", folders, tmp_path))))
    line = _one_error_line(_cli("train", path, "evaluate.group_by=f1"))
    assert "data.streaming: cannot be combined with evaluate.group_by" in line
    bad = pd.read_csv(folders["csv"])
    bad["f2"] = bad["f2"].astype(object)
    bad.loc[97, "f2"] = "seven"  # in the third chunk of 40 rows
    bad.to_csv(tmp_path / "bad.csv", index=False)
    raw = _streaming(_config("csv", {"csv": tmp_path / "bad.csv"}, tmp_path))
    raw["data"]["streaming"]["cache_dir"] = str(tmp_path / "cache")
    with pytest.raises(DataError, match=r"bad\.csv: data row 98, column 'f2': 'seven' is not a"):
        train_run(parse_config(raw))
    assert list((tmp_path / "cache").iterdir()) == []  # the half-written copy is removed


def test_cityscapes_streams_the_in_memory_scenes_and_names_a_bad_label_file(
    tmp_path: Path,
) -> None:
    rng = np.random.default_rng(1)
    shapes = {"image": (128, 256, 3), "label_7": (128, 256), "depth": (128, 256)}  # 2-D depth
    for part, n in (("train", 3), ("val", 1)):
        for folder, shape in shapes.items():
            (tmp_path / part / folder).mkdir(parents=True)
            for i in range(n):
                low, high = (-1, 7) if folder == "label_7" else (0, 5)
                np.save(tmp_path / part / folder / f"{i}.npy", rng.uniform(low, high, shape))
    params = {"path": str(tmp_path), "check_counts": False, "val_fraction": 0.0}
    raw = {"seed": 0, "data": {"dataset": "cityscapes", "params": params}}
    memory, streamed = build_data(parse_config(raw)), build_data(parse_config(_streaming(raw)))
    assert [t.to_dict() for t in streamed.tasks] == [t.to_dict() for t in memory.tasks]
    for split in ("train", "test"):
        everything = torch.arange(len(getattr(memory, split)))
        (x, y), (u, v) = (getattr(b, split).take(everything) for b in (memory, streamed))
        assert torch.equal(x, u) and all(torch.equal(y[t], v[t]) for t in y)
    np.save(tmp_path / "val" / "label_7" / "0.npy", np.full(shapes["label_7"], 9.0))
    streamed = build_data(parse_config(_streaming(raw)))
    with pytest.raises(DataError, match=r"val/label_7/0\.npy: class above 6"):
        streamed.test.take(torch.arange(1))


def test_report_of_a_streamed_dense_run(folders: dict[str, Path], tmp_path: Path) -> None:
    """The label maps of a streamed dense split are not in memory: the report's data section
    says so instead of failing."""
    raw = _streaming(_config("nyuv2", folders, tmp_path))
    raw["train"]["epochs"] = 1
    train_run(parse_config(raw), run_dir=tmp_path / "streamed")
    result = _cli("report", tmp_path / "streamed")
    assert result.exit_code == 0, result.output
    page = (tmp_path / "streamed" / "report.html").read_text()
    assert "streamed: not counted" in page
