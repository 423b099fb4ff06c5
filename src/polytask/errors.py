"""Typed errors raised by the library; only the CLI turns them into a red line and exit code 1."""

from __future__ import annotations

from collections.abc import Iterable


class PolytaskError(Exception):
    """Base class of every error polytask raises on purpose (bad input, not a bug)."""


class ConfigError(PolytaskError):
    """A run configuration is invalid; the message names the file and every bad field."""


class DataError(PolytaskError):
    """Input data is unusable; the message names the file, column or row."""


class CheckpointError(PolytaskError):
    """A run folder or checkpoint is missing or unreadable."""


class ExportError(PolytaskError):
    """A model cannot be exported (the message names the module or component that stops it), or
    an exported model's files are missing or of a format this polytask does not read."""


class RunInterrupted(PolytaskError):
    """A run was stopped by Ctrl-C or SIGTERM; the message names its folder and how to resume.
    The command line exits with code 130."""

    exit_code = 130

    @classmethod
    def in_folder(cls, path: object) -> RunInterrupted:
        """The interruption of the run in folder ``path``."""
        return cls(
            f"interrupted; the run is in {path}; continue with: polytask train --resume {path}"
        )


class UnknownNameError(PolytaskError, KeyError):
    """A name was looked up in a registry that does not hold it."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


def unknown_name(kind: str, names: str | Iterable[str], known: Iterable[str]) -> str:
    """The one message for names that are not among the known ones.

    >>> unknown_name("task", ["x", "y"], ["b", "a"])
    'unknown task(s) x, y; known: a, b'
    >>> unknown_name("sampler", "zipf", ["uniform"])
    "unknown sampler 'zipf'; known: uniform"
    """
    listed = ", ".join(sorted(known)) or "none"
    if isinstance(names, str):
        return f"unknown {kind} {names!r}; known: {listed}"
    return f"unknown {kind}(s) {', '.join(names)}; known: {listed}"
