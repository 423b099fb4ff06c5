"""The one atomic write, and strict JSON.

Every file polytask keeps (checkpoints, ``config.yaml``, ``run.json``, ``results.json``, plots,
predictions) goes through ``atomic_path``.

The data is written to a temporary file in the destination folder, flushed and fsynced, renamed
over the destination (``os.replace``, atomic on POSIX and Windows) and the folder is fsynced, so
a crash at any point leaves either the old file or the new one, never a mix. On any error the
temporary file is removed and the destination is left untouched.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> folder = Path(tempfile.mkdtemp())
    >>> write_text_atomic(folder / "a.txt", "hello")
    >>> (folder / "a.txt").read_text()
    'hello'
    >>> sorted(p.name for p in folder.iterdir())  # no temporary left behind
    ['a.txt']
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = [
    "atomic_path",
    "json_ready",
    "remove_temporaries",
    "strict_json",
    "write_bytes_atomic",
    "write_text_atomic",
]


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary path to write ``path``'s new content to; on leaving the block without error it
    is fsynced and renamed over ``path``, on an error it is removed.

    The temporary file sits in the same folder (so the rename is atomic) and keeps the suffix of
    ``path`` (so writers that pick a format by suffix, such as ``savefig``, still do)."""
    path = Path(path)
    handle, name = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{''.join(path.suffixes)}"
    )
    os.close(handle)
    temporary = Path(name)
    try:
        # mkstemp creates the file 0600: give it the mode a plain open() would (the existing
        # file's, or 0666 less the umask), so results and models stay readable by others
        os.chmod(temporary, _mode_for(path))
        yield temporary
        with open(temporary, "rb+") as file:
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _current_umask()  # read once, at import: os.umask can only be read by setting it


def _mode_for(path: Path) -> int:
    """The permission bits a new version of ``path`` gets: those of the file it replaces, or
    ``0o666`` less the process umask for a new file."""
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return 0o666 & ~_UMASK


#: ``.<name>.<8 random characters>.tmp<suffixes>``: the temporary files of ``atomic_path`` (and of
#: ``data.files.write_frame``, which names them the same way) that a killed process leaves.
_TEMPORARY = re.compile(r"\..+\.[A-Za-z0-9_]{8}\.tmp(\.[^.]+)*")


def remove_temporaries(folder: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporary files a process killed while writing into ``folder`` left there
    (not in its subfolders); returns them. Call it only while no other process writes there.

    >>> folder = Path(tempfile.mkdtemp())
    >>> (folder / ".last.safetensors.x1y2z3w4.tmp.safetensors").write_bytes(b"torn")
    4
    >>> [p.name for p in remove_temporaries(folder)], list(folder.iterdir())
    (['.last.safetensors.x1y2z3w4.tmp.safetensors'], [])
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for path in sorted(folder.iterdir()):
        if _TEMPORARY.fullmatch(path.name) and path.is_file() and not path.is_symlink():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Replace ``path`` by ``data`` atomically (see ``atomic_path``)."""
    with atomic_path(path) as temporary, open(temporary, "wb") as file:
        file.write(data)  # a buffered write writes everything or raises


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Replace ``path`` by ``text`` (UTF-8) atomically (see ``atomic_path``)."""
    write_bytes_atomic(path, text.encode("utf-8"))


def json_ready(value: Any) -> Any:
    """Copy ``value`` with non-finite floats as ``None``, tuples as lists and numpy or 0-d torch
    scalars as Python numbers (anything else is left for ``json`` to reject).

    >>> json_ready({"a": float("nan"), "b": (1, 2.5)})
    {'a': None, 'b': [1, 2.5]}
    """
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, int):
        return int(value)
    if isinstance(value, Mapping):
        return {(k if isinstance(k, str) else str(k)): json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(v) for v in value]
    item = getattr(value, "item", None)  # numpy scalars, 0-d numpy arrays and torch tensors
    if callable(item) and getattr(value, "ndim", 0) == 0:
        return json_ready(item())
    return value


def strict_json(value: Any, *, indent: int | None = None) -> str:
    """``value`` as standard JSON (``json_ready``: no bare ``NaN`` or ``Infinity``)."""
    return json.dumps(json_ready(value), allow_nan=False, ensure_ascii=False, indent=indent)
