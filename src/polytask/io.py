"""The one atomic write: every file polytask keeps (checkpoints, ``config.yaml``, ``run.json``,
``results.json``, plots, predictions) goes through ``atomic_path``.

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

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_path", "write_bytes_atomic", "write_text_atomic"]


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
        yield temporary
        with open(temporary, "rb+") as file:
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Replace ``path`` by ``data`` atomically (see ``atomic_path``)."""
    with atomic_path(path) as temporary, open(temporary, "wb") as file:
        file.write(data)  # a buffered write writes everything or raises


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Replace ``path`` by ``text`` (UTF-8) atomically (see ``atomic_path``)."""
    write_bytes_atomic(path, text.encode("utf-8"))
