"""Typed errors raised by the library; only the CLI turns them into a red line and exit code 1."""

from __future__ import annotations


class PolytaskError(Exception):
    """Base class of every error polytask raises on purpose (bad input, not a bug)."""


class ConfigError(PolytaskError):
    """A run configuration is invalid; the message names the file and every bad field."""


class DataError(PolytaskError):
    """Input data is unusable; the message names the file, column or row."""


class CheckpointError(PolytaskError):
    """A run folder or checkpoint is missing or unreadable."""


class UnknownNameError(PolytaskError, KeyError):
    """A name was looked up in a registry that does not hold it."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""
