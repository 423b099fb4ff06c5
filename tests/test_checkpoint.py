"""Checkpoints: exact round trips, resumable training, atomic writes, clear errors."""

from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.torch
import torch
from torch import nn

import polytask.io
from polytask.errors import CheckpointError
from polytask.train.checkpoint import (
    capture_rng_state,
    load_checkpoint,
    read_checkpoint_metadata,
    restore_rng_state,
    save_checkpoint,
)


def _training_objects(seed: int) -> tuple[nn.Module, torch.optim.AdamW, Any]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, betas=(0.8, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 0.5**epoch)
    return model, optimizer, scheduler


def _step(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, n: int) -> None:
    x = torch.linspace(-1.0, 1.0, 4 * 5).reshape(5, 4) + n
    loss = model(x).pow(2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    scheduler.step()


def _assert_same(a: Any, b: Any, where: str = "state") -> None:
    """Deep equality with exact types, bit-equal tensors/arrays and nan == nan.

    Mappings (``state_dict()`` returns an ``OrderedDict``) come back as plain dicts."""
    if isinstance(a, dict):
        assert type(b) is dict, f"{where}: {type(b)} is not a dict"
    else:
        assert type(a) is type(b), f"{where}: {type(a)} != {type(b)}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b) or torch.allclose(a, b, rtol=0, atol=0, equal_nan=True), where
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert a.tobytes() == b.tobytes(), where
    elif isinstance(a, dict):
        assert list(a.keys()) == list(b.keys()), where
        assert [type(k) for k in a] == [type(k) for k in b], where
        for key in a:
            _assert_same(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{where}/{i}")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), where
    else:
        assert a == b, where


def _realistic_state() -> tuple[dict[str, Any], nn.Module, Any, Any]:
    model, optimizer, scheduler = _training_objects(seed=0)
    for n in range(2):
        _step(model, optimizer, scheduler, n)
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "balancer": {"weights": torch.tensor([0.5, 1.5]), "per_task": {0: 1.0, 1: (2, 3.5)}},
        "epoch": 3,
        "rng": capture_rng_state(),
        "config": {"name": "demo", "betas": (0.9, 0.999), "none": None, "flag": True},
        "history": [[1, 2.5, float("nan")], [], {"best": float("-inf"), "worst": math.inf}],
        "arrays": [np.arange(6, dtype=np.int16).reshape(2, 3), np.array([1.5], dtype=">f8")],
        "np_scalars": (np.float32(0.1), np.int64(-7), np.bool_(True), np.complex64(1 - 2j)),
        "views": (base, base[1], base.T, base[:, ::2]),  # shared storage, non-contiguous
        "marker_like": {"__tensor__": "not a marker", "__float__": "nan"},
        "odd": {
            "__tensor__": "not a marker",
            (1, "a"): None,
            0: "int key",
            "0": "str key",
            2**70: -0.0,
        },
        "tensors": {
            "scalar": torch.tensor(3),
            "empty": torch.zeros(0, 5),
            "bf16": torch.ones(2, dtype=torch.bfloat16),
            "bool": torch.tensor([True, False]),
            "param": nn.Parameter(torch.ones(2)),
        },
    }
    return state, model, optimizer, scheduler


def test_round_trip_of_a_realistic_state(tmp_path: Path) -> None:
    state, *_ = _realistic_state()
    path = tmp_path / "last.safetensors"
    save_checkpoint(path, state)
    loaded = load_checkpoint(path)

    expected = dict(state)
    expected["tensors"] = {**state["tensors"], "param": state["tensors"]["param"].detach()}
    _assert_same(expected, loaded)
    assert isinstance(loaded["optimizer"]["state"][0]["exp_avg"], torch.Tensor)
    assert loaded["arrays"][1].dtype == np.dtype(">f8")
    assert math.copysign(1.0, loaded["odd"][2**70]) == -1.0
    assert all(t.device.type == "cpu" for t in loaded["model"].values())
    # loaded tensors are independent and writable
    loaded["views"][1].add_(1)
    assert torch.equal(loaded["views"][0], state["views"][0])
    assert not any(p.name != path.name for p in tmp_path.iterdir())


def test_loading_into_fresh_objects_resumes_exactly(tmp_path: Path) -> None:
    state, model, optimizer, scheduler = _realistic_state()
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, state)

    loaded = load_checkpoint(path)
    model2, optimizer2, scheduler2 = _training_objects(seed=1)
    assert not torch.equal(model2[0].weight, model[0].weight)
    model2.load_state_dict(loaded["model"])
    optimizer2.load_state_dict(loaded["optimizer"])
    scheduler2.load_state_dict(loaded["scheduler"])

    for params in (model.parameters(), model2.parameters()):
        assert all(p.requires_grad for p in params)
    _step(model, optimizer, scheduler, 2)
    _step(model2, optimizer2, scheduler2, 2)
    for (name, a), b in zip(model.state_dict().items(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert scheduler.get_last_lr() == scheduler2.get_last_lr()
    _assert_same(optimizer.state_dict(), optimizer2.state_dict())


def test_metadata_is_readable_without_tensors(tmp_path: Path) -> None:
    state, *_ = _realistic_state()
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, state)
    meta = read_checkpoint_metadata(path)
    assert meta["epoch"] == 3
    assert meta["config"]["name"] == "demo"
    assert meta["optimizer"]["state"]["__dict__"][0][0] == 0
    assert meta["model"]["0.weight"] == {"__tensor__": "model/0.weight"}
    json.dumps(meta, allow_nan=False)  # plain JSON all the way down


def test_state_without_tensors_and_key_collisions(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "small.safetensors"  # parent folder is created
    save_checkpoint(path, {"epoch": 1, "tags": ("a",)})
    assert load_checkpoint(path) == {"epoch": 1, "tags": ("a",)}

    a, b = torch.ones(2), torch.zeros(2)
    save_checkpoint(path, {"x": {0: a, "0": b}, "x/0": a + 2})
    loaded = load_checkpoint(path)
    assert torch.equal(loaded["x"][0], a) and torch.equal(loaded["x"]["0"], b)
    assert torch.equal(loaded["x/0"], a + 2)


def test_unsupported_value_is_a_type_error_naming_its_path(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="config/when"):
        save_checkpoint(tmp_path / "x.safetensors", {"config": {"when": object()}})
    assert list(tmp_path.iterdir()) == []


def _fail(*args: Any, **kwargs: Any) -> None:
    raise OSError("simulated crash")


class _HalfThenFail:
    """Stands for ``open`` in ``polytask.io``: the file it opens takes half of what is written,
    then the disk is full."""

    def __init__(self, path: Any, mode: str = "r") -> None:
        self.file = open(path, mode)  # noqa: SIM115 - closed in __exit__

    def __enter__(self) -> _HalfThenFail:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.file.close()

    def write(self, data: bytes) -> int:
        self.file.write(data[: len(data) // 2])
        self.file.flush()
        raise OSError("No space left on device (simulated)")


@pytest.mark.parametrize(
    ("target", "name", "replacement"),
    [
        (safetensors.torch, "save", _fail),
        (polytask.io, "open", _HalfThenFail),
        (os, "replace", _fail),
    ],
    ids=["serialize", "write", "rename"],
)
def test_a_crash_while_saving_keeps_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, target: Any, name: str, replacement: Any
) -> None:
    path = tmp_path / "last.safetensors"
    save_checkpoint(path, {"epoch": 1, "w": torch.ones(3)})
    before = path.read_bytes()

    monkeypatch.setattr(target, name, replacement, raising=False)
    with pytest.raises(CheckpointError, match="simulated") as info:
        save_checkpoint(path, {"epoch": 2, "w": torch.zeros(1000)})
    monkeypatch.undo()
    message = str(info.value)  # one line naming the file; the CLI prints it as it is
    assert message.startswith(f"{path}: cannot write checkpoint") and "\n" not in message
    assert "previous checkpoint is unchanged" in message

    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no tmp file left behind
    assert load_checkpoint(path)["epoch"] == 1


def _one_line_error(path: Path) -> str:
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    return message


def test_unreadable_files_raise_checkpoint_error(tmp_path: Path) -> None:
    assert "not found" in _one_line_error(tmp_path / "missing.safetensors")
    assert "folder" in _one_line_error(tmp_path)

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01not a checkpoint at all" * 10)
    _one_line_error(garbage)

    good = tmp_path / "good.safetensors"
    save_checkpoint(good, {"w": torch.arange(100.0)})
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-50])
    _one_line_error(truncated)

    foreign = tmp_path / "foreign.safetensors"
    safetensors.torch.save_file({"w": torch.ones(2)}, str(foreign))
    assert "not a polytask checkpoint" in _one_line_error(foreign)
    with pytest.raises(CheckpointError, match="not a polytask checkpoint"):
        read_checkpoint_metadata(foreign)
    with pytest.raises(CheckpointError, match="garbage"):
        read_checkpoint_metadata(garbage)

    bad_json = tmp_path / "bad_json.safetensors"
    bad_json.write_bytes(safetensors.torch.save({}, metadata={"polytask": "{oops"}))
    assert "corrupt polytask metadata" in _one_line_error(bad_json)

    missing_tensor = tmp_path / "missing_tensor.safetensors"
    skeleton = json.dumps({"version": 1, "state": {"w": {"__tensor__": "w"}}})
    missing_tensor.write_bytes(safetensors.torch.save({}, metadata={"polytask": skeleton}))
    assert "missing" in _one_line_error(missing_tensor)

    future = tmp_path / "future.safetensors"
    skeleton = json.dumps({"version": 99, "state": {}})
    future.write_bytes(safetensors.torch.save({}, metadata={"polytask": skeleton}))
    assert "version 99" in _one_line_error(future)


def _draw() -> tuple[float, float, np.ndarray, float, torch.Tensor]:
    # gauss()/standard_normal() first: they use the cached second gaussian of each state.
    return (
        random.gauss(0.0, 1.0),
        random.random(),
        np.random.rand(3),
        float(np.random.standard_normal()),
        torch.rand(3),
    )


def test_rng_state_survives_a_checkpoint(tmp_path: Path) -> None:
    random.gauss(0.0, 1.0)  # leaves a cached gaussian in Python's state
    np.random.standard_normal()  # and in NumPy's
    path = tmp_path / "rng.safetensors"
    save_checkpoint(path, {"rng": capture_rng_state()})
    first = _draw()

    restore_rng_state(load_checkpoint(path)["rng"])
    again = _draw()
    assert first[:2] == again[:2]
    assert np.array_equal(first[2], again[2]) and first[3] == again[3]
    assert torch.equal(first[4], again[4])


def test_bad_rng_state_is_a_checkpoint_error() -> None:
    with pytest.raises(CheckpointError, match="RNG"):
        restore_rng_state({"torch": "not a state"})


# --------------------------------------------------------------------------- checksums

FIXTURES = Path(__file__).parent / "fixtures" / "runs-5eec728"


def _flip_byte(path: Path, offset_from_end: int) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("offset_from_end", [1, 7, 40, 400])
def test_flipped_bytes_in_a_tensor_are_refused_naming_the_file(
    tmp_path: Path, offset_from_end: int
) -> None:
    path = tmp_path / "best.safetensors"
    save_checkpoint(path, {"epoch": 3, "w": torch.linspace(0.0, 1.0, 200), "n": torch.arange(5)})
    assert load_checkpoint(path)["epoch"] == 3
    _flip_byte(path, offset_from_end)  # inside the tensor data: safetensors itself cannot tell
    assert "checksum" in _one_line_error(path)


def test_a_checkpoint_records_the_sha256_of_its_tensors(tmp_path: Path) -> None:
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, {"w": torch.ones(2, dtype=torch.bfloat16), "empty": torch.zeros(0)})
    with safetensors.safe_open(str(path), framework="pt") as file:
        digest = file.metadata()["polytask_sha256"]
    assert len(digest) == 64 and int(digest, 16) >= 0
    # the metadata read without the tensors is not checked (nothing to check it against)
    assert "w" in read_checkpoint_metadata(path)


@pytest.mark.parametrize("name", ["tiny-uncertainty", "tiny-mgda"])
@pytest.mark.parametrize("which", ["best", "last"])
def test_checkpoints_without_a_checksum_still_load(name: str, which: str) -> None:
    path = FIXTURES / name / "checkpoints" / f"{which}.safetensors"
    with safetensors.safe_open(str(path), framework="pt") as file:
        assert "polytask_sha256" not in file.metadata()  # written before checksums
    assert load_checkpoint(path)["format"] == "polytask-checkpoint/1"
