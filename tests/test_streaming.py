"""Streaming folders through a DataLoader: the same batches as the in-memory path, resume-exact
epochs, disjoint DDP shares, worker processes, and the streamed normalisation statistics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from polytask.data.audio import tone, write_wav
from polytask.data.batches import BatchLoader
from polytask.data.bundle import build_bundle
from polytask.data.sources import DATASETS
from polytask.data.streaming import StreamingBatches, stream_audio_folder, stream_image_folder
from polytask.errors import ConfigError, DataError

TASKS = [
    {"name": "digit", "kind": "multiclass", "num_classes": 5},
    {"name": "bright", "kind": "binary"},
]
SIZE = (8, 8)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """37 small noisy RGB images (PNG) with two labels; a prime count, so batches are ragged."""
    path = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(37):
        pixels = rng.integers(0, 256, size=(SIZE[0], SIZE[1], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path / f"im{i:03d}.png")
        rows.append(f"im{i:03d}.png,{i % 5},{'' if i == 7 else int(pixels.mean() > 127)}")
    (path / "labels.csv").write_text("file,digit,bright\n" + "\n".join(rows) + "\n")
    return path


def _stream(folder: Path, **kwargs: object) -> StreamingBatches:
    _, splits = stream_image_folder(str(folder), TASKS, size=SIZE, mode="RGB", normalize=False)
    return StreamingBatches(splits["train"], 4, shuffle=True, seed=3, **kwargs)  # type: ignore[arg-type]


def _epoch(batches: StreamingBatches | BatchLoader, epoch: int) -> list[tuple[torch.Tensor, ...]]:
    batches.set_epoch(epoch)
    return [(x, y["digit"], y["bright"]) for x, y in batches]  # type: ignore[misc]


def _same(a: list[tuple[torch.Tensor, ...]], b: list[tuple[torch.Tensor, ...]]) -> bool:
    return len(a) == len(b) and all(
        torch.equal(u, v) or torch.allclose(u, v, equal_nan=True)
        for p, q in zip(a, b, strict=True)
        for u, v in zip(p, q, strict=True)
    )


def test_streamed_batches_equal_the_in_memory_batches(folder: Path) -> None:
    table = DATASETS.get("image-folder")(
        seed=0, path=str(folder), tasks=TASKS, size=list(SIZE), mode="RGB", normalize=False
    )
    bundle = build_bundle(table, seed=0, standardize=False)
    memory = BatchLoader(bundle.train, 4, shuffle=True, seed=3)
    streamed = _stream(folder)
    assert len(streamed) == len(memory) == 7  # 25 training images of 37, batches of 4
    for epoch in (0, 1):
        assert _same(_epoch(streamed, epoch), _epoch(memory, epoch))
    assert not _same(_epoch(streamed, 0), _epoch(streamed, 1))  # reshuffled per epoch


def test_resume_draws_the_batches_of_an_uninterrupted_run(folder: Path) -> None:
    uninterrupted = _stream(folder)
    straight = [_epoch(uninterrupted, e) for e in range(3)]
    first = _stream(folder)
    _epoch(first, 0)
    _epoch(first, 1)  # stop after epoch 1; a new process resumes at epoch 2
    resumed = _stream(folder)
    assert _same(_epoch(resumed, 2), straight[2])
    assert _same(_epoch(resumed, 1), straight[1])


def test_ddp_ranks_read_disjoint_shares_that_make_up_the_epoch(folder: Path) -> None:
    single = StreamingBatches(_stream(folder).dataset, 8, shuffle=True, seed=3)
    ranks = [
        StreamingBatches(_stream(folder).dataset, 4, shuffle=True, seed=3, rank=r, world_size=2)
        for r in range(2)
    ]
    assert len(ranks[0]) == len(ranks[1]) == len(single) == 4  # same steps on every rank
    seen: list[list[bytes]] = [[], []]
    for rank, batches in enumerate(ranks):
        for x, _, _ in _epoch(batches, 1):
            seen[rank] += [row.numpy().tobytes() for row in x]
    whole = [row.numpy().tobytes() for x, _, _ in _epoch(single, 1) for row in x]
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(whole) and len(whole) == 25
    # the union of the ranks' shares of every step is that step's global batch
    for step, (a, b, c) in enumerate(
        zip(_epoch(ranks[0], 1), _epoch(ranks[1], 1), _epoch(single, 1), strict=True)
    ):
        assert torch.equal(torch.cat([a[0], b[0]]), c[0]), step


def test_worker_processes_give_the_same_batches(folder: Path) -> None:
    in_process = _epoch(_stream(folder), 2)
    with_workers = _stream(folder, workers=2, prefetch=2)
    assert _same(_epoch(with_workers, 2), in_process)
    assert _same(_epoch(with_workers, 2), in_process)  # persistent workers, a second epoch


def test_normalisation_statistics_match_the_in_memory_ones(folder: Path) -> None:
    table = DATASETS.get("image-folder")(
        seed=0, path=str(folder), tasks=TASKS, size=list(SIZE), mode="RGB"
    )
    bundle = build_bundle(table, seed=0)
    _, splits = stream_image_folder(str(folder), TASKS, size=SIZE, mode="RGB")
    fitted = bundle.preprocessors[""]
    streamed = splits["train"].normalizer
    assert streamed is not None
    assert np.allclose(streamed.mean, fitted.mean, atol=1e-6)  # type: ignore[attr-defined]
    assert np.allclose(streamed.std, fitted.std, atol=1e-6)  # type: ignore[attr-defined]
    x, _ = next(iter(StreamingBatches(splits["test"], 100)))
    assert torch.allclose(x, bundle.test.inputs, atol=1e-5)  # type: ignore[arg-type]


def test_audio_folder_streams_fixed_length_clips(tmp_path: Path) -> None:
    rows = []
    for i in range(10):
        write_wav(
            tmp_path / f"a{i}.wav", 0.5 * tone(200 + 50 * i, seconds=0.05, sample_rate=8000), 8000
        )
        rows.append(f"a{i}.wav,{i % 2}")
    (tmp_path / "labels.csv").write_text("file,high\n" + "\n".join(rows) + "\n")
    tasks = [{"name": "high", "kind": "binary"}]
    _, splits = stream_audio_folder(str(tmp_path), tasks, seconds=0.1, sample_rate=4000)
    inputs, labels = next(iter(StreamingBatches(splits["train"], 3)))
    assert inputs["audio"].shape == (3, 400) and labels["high"].shape == (3,)  # type: ignore[index]
    assert torch.all(inputs["audio"][:, 200:] == 0)  # type: ignore[index]  # zero-padded
    with pytest.raises(ConfigError, match="seconds must be positive"):
        stream_audio_folder(str(tmp_path), tasks, seconds=0)


def test_bad_folders_and_settings_are_one_clear_error(folder: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such folder"):
        stream_image_folder(str(tmp_path / "nowhere"), TASKS)
    (tmp_path / "labels.csv").write_text("file,digit,bright\ngone.png,1,0\n")
    _, splits = stream_image_folder(
        str(tmp_path), TASKS, normalize=False, val_fraction=0, test_fraction=0
    )
    with pytest.raises(DataError, match=r"gone\.png: no such image file"):
        next(iter(StreamingBatches(splits["train"], 1)))
    with pytest.raises(ConfigError, match="workers must be >= 0"):
        _stream(folder, workers=-1)
    with pytest.raises(DataError, match="rank 2 is outside"):
        _stream(folder, rank=2, world_size=2)
