"""Crash-proof checkpoints: one safetensors file holding tensors and a JSON skeleton.

Format (version 1)
------------------
A checkpoint is a single ``.safetensors`` file. Its header metadata holds two strings:
``"format": "pt"`` and ``"polytask"``, a JSON document ``{"version": 1, "state": SKELETON}``.
SKELETON is the saved state with every value JSON cannot hold replaced by a marker object:

* ``{"__tensor__": KEY}``: a ``torch.Tensor``, stored in the safetensors tensor dict under
  KEY (its path in the state, e.g. ``"optimizer/state/0/exp_avg"``); it comes back on CPU,
  contiguous, detached, with the same dtype and shape.
* ``{"__ndarray__": KEY, "dtype": "<u4", "shape": [624]}``: a NumPy array, stored as its raw
  bytes (a ``uint8`` tensor under KEY) and rebuilt with the exact dtype (byte order included).
* ``{"__npscalar__": "<f4", "value": 1.5}``: a NumPy scalar such as ``np.float32(1.5)``
  (complex, long double, datetime... scalars: ``{"__npscalar__": NDARRAY_MARKER}``).
* ``{"__tuple__": [...]}``: a tuple (JSON only has lists).
* ``{"__float__": "nan" | "inf" | "-inf"}``: a non-finite float.
* ``{"__dict__": [[KEY, VALUE], ...]}``: a dict whose keys are not all strings (the optimizer
  state uses int keys), or whose keys would be mistaken for a marker; keys are encoded like
  values, so ``0``, ``(1, 2)`` or ``None`` come back with their type.

The header metadata also holds ``"polytask_sha256"``, the SHA-256 of the JSON document and of
every tensor (name, dtype, shape and bytes, in name order): a file whose bytes changed on disk
is refused when it is loaded. Checkpoints written before the checksum existed have no such
entry and load unchecked.

Nothing is ever pickled: loading runs no code. Saving goes through ``polytask.io``'s one atomic
write (a temporary file in the same folder, fsynced, renamed over ``path``, the folder fsynced),
so ``path`` always holds either the previous checkpoint or the new one, never a mix.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from safetensors import safe_open
from safetensors.torch import load as load_safetensors_bytes

from polytask.errors import CheckpointError
from polytask.io import write_bytes_atomic

__all__ = [
    "CHECKPOINT_FORMAT",
    "FORMAT_VERSION",
    "capture_rng_state",
    "copy_checkpoint",
    "load_checkpoint",
    "read_checkpoint_metadata",
    "restore_rng_state",
    "save_checkpoint",
    "save_run_checkpoint",
]

FORMAT_VERSION = 1
"""Version of the JSON skeleton layout written by :func:`save_checkpoint`."""

CHECKPOINT_FORMAT = "polytask-checkpoint/1"
"""The ``format`` entry of a Trainer's state (what it needs to continue a run exactly)."""

_METADATA_KEY = "polytask"
_CHECKSUM_KEY = "polytask_sha256"
_TENSOR = "__tensor__"
_NDARRAY = "__ndarray__"
_NPSCALAR = "__npscalar__"
_TUPLE = "__tuple__"
_FLOAT = "__float__"
_DICT = "__dict__"
_MARKER_ORDER = (_TENSOR, _NDARRAY, _NPSCALAR, _TUPLE, _FLOAT, _DICT)
_MARKERS = frozenset(_MARKER_ORDER)


# --------------------------------------------------------------------------- encoding


class _Encoder:
    """Turns a nested state into a JSON skeleton plus a flat dict of CPU tensors."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}

    def _key(self, path: str) -> str:
        key = path or "tensor"
        n = 1
        while key in self.tensors:
            n += 1
            key = f"{path}#{n}"
        return key

    def encode(self, value: Any, path: str) -> Any:
        if value is None or isinstance(value, (bool, str)):
            return value
        if isinstance(value, int) and not isinstance(value, np.generic):
            return int(value)
        if isinstance(value, float) and not isinstance(value, np.generic):
            return _encode_float(float(value))
        if isinstance(value, torch.Tensor):
            return {_TENSOR: self._add_tensor(value, path)}
        if isinstance(value, np.ndarray):
            return self._encode_ndarray(value, path)
        if isinstance(value, np.generic):
            return self._encode_npscalar(value, path)
        if isinstance(value, tuple):
            return {_TUPLE: [self.encode(v, _join(path, i)) for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [self.encode(v, _join(path, i)) for i, v in enumerate(value)]
        if isinstance(value, Mapping):
            return self._encode_mapping(value, path)
        raise TypeError(
            f"cannot save a value of type {type(value).__name__} at {path or '/'!r} in a "
            "checkpoint (allowed: dict, list, tuple, int, float, str, bool, None, "
            "torch.Tensor, numpy arrays and scalars)"
        )

    def _add_tensor(self, tensor: torch.Tensor, path: str) -> str:
        if tensor.layout != torch.strided:
            raise TypeError(f"cannot save a {tensor.layout} tensor at {path!r}; make it dense")
        # clone: tensors sharing storage (views, tied weights) must be saved as separate blocks.
        key = self._key(path)
        self.tensors[key] = tensor.detach().to("cpu", copy=True).contiguous()
        return key

    def _encode_ndarray(self, array: np.ndarray, path: str) -> dict[str, Any]:
        if array.dtype.hasobject or array.dtype.fields is not None:
            raise TypeError(
                f"cannot save a numpy array of dtype {array.dtype} at {path!r} "
                "(object and structured dtypes are not supported)"
            )
        raw = np.frombuffer(np.ascontiguousarray(array).tobytes(), dtype=np.uint8)
        key = self._key(path)
        self.tensors[key] = torch.from_numpy(raw.copy())
        return {_NDARRAY: key, "dtype": array.dtype.str, "shape": list(array.shape)}

    def _encode_npscalar(self, scalar: np.generic, path: str) -> dict[str, Any]:
        dtype = scalar.dtype
        if dtype.kind in "biu" or (dtype.kind == "f" and dtype.itemsize <= 8):
            # Exact in JSON: Python ints are unbounded, float16/32/64 widen to a double.
            return {_NPSCALAR: dtype.str, "value": self.encode(scalar.item(), path)}
        # Complex, long double, datetime, bytes...: stored as a 0-d array, bit for bit.
        return {_NPSCALAR: self._encode_ndarray(np.asarray(scalar), path)}

    def _encode_mapping(self, mapping: Mapping[Any, Any], path: str) -> Any:
        keys = list(mapping.keys())
        if all(isinstance(k, str) for k in keys) and not _MARKERS.intersection(keys):
            return {k: self.encode(v, _join(path, k)) for k, v in mapping.items()}
        return {
            _DICT: [
                [self.encode(k, _join(path, f"key{i}")), self.encode(v, _join(path, k))]
                for i, (k, v) in enumerate(mapping.items())
            ]
        }


def _join(path: str, key: Any) -> str:
    return f"{path}/{key}" if path else str(key)


def _encode_float(value: float) -> Any:
    if math.isnan(value):
        return {_FLOAT: "nan"}
    if math.isinf(value):
        return {_FLOAT: "inf" if value > 0 else "-inf"}
    return value


def _decode(value: Any, tensors: Mapping[str, torch.Tensor], where: str) -> Any:
    """Inverse of :meth:`_Encoder.encode`; ``where`` names the file in error messages."""
    if isinstance(value, list):
        return [_decode(v, tensors, where) for v in value]
    if not isinstance(value, dict):
        return value
    kind = next((marker for marker in _MARKER_ORDER if marker in value), None)
    if kind is None:
        return {k: _decode(v, tensors, where) for k, v in value.items()}
    body = value[kind]
    if kind == _TENSOR:
        return _tensor(tensors, body, where)
    if kind == _NDARRAY:
        raw = _tensor(tensors, body, where)
        try:
            dtype = np.dtype(value["dtype"])
            return np.frombuffer(raw.numpy().tobytes(), dtype=dtype).reshape(value["shape"]).copy()
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{where}: bad numpy array {body!r} ({exc})") from exc
    if kind == _NPSCALAR:
        if isinstance(body, str):
            return np.dtype(body).type(_decode(value["value"], tensors, where))
        array = _decode(body, tensors, where)
        if not isinstance(array, np.ndarray) or array.shape != ():
            raise CheckpointError(f"{where}: bad numpy scalar marker {value!r}")
        return array[()]
    if kind == _TUPLE:
        return tuple(_decode(v, tensors, where) for v in body)
    if kind == _FLOAT:
        if body not in ("nan", "inf", "-inf"):
            raise CheckpointError(f"{where}: bad float marker {body!r}")
        return float(body)
    pairs = [(_decode(k, tensors, where), _decode(v, tensors, where)) for k, v in body]
    return dict(pairs)


def _tensor(tensors: Mapping[str, torch.Tensor], key: Any, where: str) -> torch.Tensor:
    if not isinstance(key, str) or key not in tensors:
        raise CheckpointError(f"{where}: the skeleton names tensor {key!r}, which is missing")
    return tensors[key]


# --------------------------------------------------------------------------- files


def _checksum(text: str, tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of the JSON document and of every tensor's name, dtype, shape and bytes."""
    digest = hashlib.sha256(text.encode("utf-8"))
    for key in sorted(tensors):
        tensor = tensors[key]
        described = json.dumps([key, str(tensor.dtype), list(tensor.shape)], ensure_ascii=False)
        digest.update(described.encode("utf-8"))
        raw = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        digest.update(raw.numpy().data)
    return digest.hexdigest()


def save_checkpoint(path: Path, state: Mapping[str, Any]) -> None:
    """Save a nested ``state`` (dicts, lists, tuples, scalars, tensors, arrays) atomically.

    The parent folder is created if needed. Raises ``TypeError`` naming the offending path
    for a value that can't be saved (anything else than the types above), and
    ``CheckpointError`` (one line naming ``path``) when the file cannot be written (a full
    disk...): ``path`` then still holds the previous checkpoint, if there was one.
    """
    path = Path(path)
    encoder = _Encoder()
    skeleton = encoder.encode(dict(state), "")
    text = json.dumps(
        {"version": FORMAT_VERSION, "state": skeleton}, allow_nan=False, ensure_ascii=False
    )
    metadata = {
        _METADATA_KEY: text,
        _CHECKSUM_KEY: _checksum(text, encoder.tensors),
        "format": "pt",
    }
    try:
        data = safetensors.torch.save(encoder.tensors, metadata=metadata)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(path, data)
    except OSError as exc:
        raise _write_error(path, exc) from exc


def _write_error(path: Path, exc: OSError) -> CheckpointError:
    reason = exc.strerror or _one_line(exc)
    if exc.filename and Path(exc.filename).name != path.name:
        reason = f"{exc.filename}: {reason}"
    return CheckpointError(
        f"{path}: cannot write checkpoint ({reason}); the previous checkpoint is unchanged"
    )


def copy_checkpoint(source: Path, target: Path) -> None:
    """Copy a checkpoint file to ``target`` atomically (e.g. ``last`` → ``best``)."""
    data = _read_bytes(Path(source))
    try:
        write_bytes_atomic(target, data)
    except OSError as exc:
        raise _write_error(Path(target), exc) from exc


def save_run_checkpoint(directory: Path, state: Mapping[str, Any], *, best: bool) -> None:
    """Write ``state`` to ``directory/last.safetensors`` and, when ``best``, copy it to
    ``best.safetensors`` (the folder is created if needed).

    A process killed between the two writes leaves ``best`` one improvement behind the
    ``last`` that records it; ``polytask.train.runlog.RunLog`` puts it right on resume."""
    last = Path(directory) / "last.safetensors"
    save_checkpoint(last, state)
    if best:
        copy_checkpoint(last, last.with_name("best.safetensors"))


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _check_file(path: Path) -> None:
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint file not found")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a checkpoint file (it is a folder or special file)")


def _read_bytes(path: Path) -> bytes:
    _check_file(path)
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read checkpoint ({_one_line(exc)})") from exc


def _parse_skeleton(path: Path, metadata: Mapping[str, str] | None) -> Any:
    """Return the ``state`` skeleton from safetensors header metadata, validated."""
    text = (metadata or {}).get(_METADATA_KEY)
    if text is None:
        raise CheckpointError(
            f"{path}: a safetensors file without polytask metadata (not a polytask checkpoint)"
        )
    try:
        document = json.loads(text)
    except ValueError as exc:
        raise CheckpointError(f"{path}: corrupt polytask metadata ({_one_line(exc)})") from exc
    if not isinstance(document, dict) or "state" not in document:
        raise CheckpointError(f"{path}: corrupt polytask metadata (no 'state' entry)")
    version = document.get("version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {version!r} is not supported "
            f"(this polytask reads version {FORMAT_VERSION})"
        )
    return document["state"]


def _header_metadata(path: Path, data: bytes) -> dict[str, str] | None:
    """The ``__metadata__`` of a safetensors buffer already validated by ``safetensors``."""
    size = int.from_bytes(data[:8], "little")
    try:
        header = json.loads(data[8 : 8 + size])
    except ValueError as exc:
        raise CheckpointError(f"{path}: corrupt safetensors header ({_one_line(exc)})") from exc
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return metadata if isinstance(metadata, dict) else None


def _verify(
    path: Path, metadata: Mapping[str, str] | None, tensors: Mapping[str, torch.Tensor]
) -> None:
    """Compare the checksum saved with the file to its content (files without one pass)."""
    expected = (metadata or {}).get(_CHECKSUM_KEY)
    if expected is None:
        return
    if _checksum((metadata or {})[_METADATA_KEY], tensors) != expected:
        raise CheckpointError(
            f"{path}: corrupt checkpoint: its content does not match the SHA-256 checksum "
            "saved with it (the file changed on disk); use another checkpoint or retrain"
        )


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint`; tensors come back on CPU.

    Raises ``CheckpointError`` (one line, naming ``path``) for a missing, truncated, corrupt
    (checksum mismatch) or non-polytask file.
    """
    path = Path(path)
    data = _read_bytes(path)
    try:
        tensors = load_safetensors_bytes(data)  # safetensors, never a pickle
    except Exception as exc:  # safetensors raises SafetensorError, ValueError, ...
        raise CheckpointError(
            f"{path}: not a readable safetensors checkpoint ({_one_line(exc)})"
        ) from exc
    metadata = _header_metadata(path, data)
    skeleton = _parse_skeleton(path, metadata)
    _verify(path, metadata, tensors)
    try:
        state = _decode(skeleton, tensors, str(path))
    except CheckpointError:
        raise
    except (TypeError, ValueError, KeyError, IndexError, AttributeError) as exc:
        raise CheckpointError(f"{path}: corrupt polytask metadata ({_one_line(exc)})") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: corrupt polytask metadata (the state is not a dict)")
    return state


def read_checkpoint_metadata(path: Path) -> dict[str, Any]:
    """Return the JSON skeleton of a checkpoint (markers in place of tensors) without
    reading the tensors, e.g. to print a run's epoch and config."""
    path = Path(path)
    _check_file(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as file:
            metadata = file.metadata()
    except Exception as exc:  # SafetensorError, OSError, ...
        raise CheckpointError(
            f"{path}: not a readable safetensors checkpoint ({_one_line(exc)})"
        ) from exc
    skeleton = _parse_skeleton(path, metadata)
    if not isinstance(skeleton, dict):
        raise CheckpointError(f"{path}: corrupt polytask metadata (the state is not a dict)")
    return skeleton


# --------------------------------------------------------------------------- RNG


def capture_rng_state() -> dict[str, Any]:
    """Snapshot Python's, NumPy's global, torch's CPU and (when available) every CUDA RNG."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _as_tuple(value: Any) -> Any:
    """Lists back to tuples, recursively (for states that went through plain JSON)."""
    if isinstance(value, (list, tuple)):
        return tuple(_as_tuple(v) for v in value)
    return value


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Restore generators from :func:`capture_rng_state` output; absent entries are skipped.

    CUDA states are restored on the devices present (none when CUDA is unavailable).
    Raises ``CheckpointError`` for a malformed state.
    """
    try:
        if state.get("python") is not None:
            random.setstate(_as_tuple(state["python"]))
        if state.get("numpy") is not None:
            numpy_state = state["numpy"]
            if isinstance(numpy_state, list):
                numpy_state = tuple(numpy_state)
            np.random.set_state(numpy_state)
        if state.get("torch") is not None:
            torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8).cpu())
        cuda_states = state.get("cuda")
        if cuda_states and torch.cuda.is_available():
            for device, cuda_state in enumerate(cuda_states[: torch.cuda.device_count()]):
                torch.cuda.set_rng_state(
                    torch.as_tensor(cuda_state, dtype=torch.uint8).cpu(), device=device
                )
    except (TypeError, ValueError, RuntimeError, KeyError, IndexError) as exc:
        raise CheckpointError(f"invalid RNG state in checkpoint ({_one_line(exc)})") from exc
