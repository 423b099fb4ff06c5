"""A stop request (SIGTERM, Ctrl-C) that is never lost.

The CLI's signal handler raises ``KeyboardInterrupt`` where the main thread happens to be. When
that is inside a finalizer or a weakref callback (matplotlib runs some while a figure is
collected), Python prints "Exception ignored in …" and goes on: the run would carry on as if
nothing had been asked. So the handler also records the request here, an unraisable-exception
hook keeps such a swallowed interrupt quiet, and the training loop calls
:func:`raise_if_stop_requested` at every step (a Python flag: no device work) to stop there.
"""

from __future__ import annotations

import sys
from typing import Any

__all__ = [
    "clear_stop_request",
    "quiet_swallowed_interrupts",
    "raise_if_stop_requested",
    "request_stop",
    "stop_requested",
]

_requested: int | None = None


def request_stop(signum: int) -> None:
    """Record that signal ``signum`` asked this process to stop."""
    global _requested
    _requested = signum


def stop_requested() -> bool:
    """Whether a stop was requested and not yet acted on."""
    return _requested is not None


def clear_stop_request() -> None:
    """Forget the request (once a command has ended, stopped or not)."""
    global _requested
    _requested = None


def raise_if_stop_requested() -> None:
    """Raise ``KeyboardInterrupt`` (and clear the request) if a stop was requested."""
    if _requested is not None:
        clear_stop_request()
        raise KeyboardInterrupt


def _unraisable(unraisable: Any) -> None:
    if isinstance(unraisable.exc_value, KeyboardInterrupt) and _requested is not None:
        return  # kept as a request: the loop stops at its next step
    sys.__unraisablehook__(unraisable)


def quiet_swallowed_interrupts() -> None:
    """Install the hook that keeps an interrupt raised inside a finalizer quiet (it stays
    recorded by :func:`request_stop`)."""
    sys.unraisablehook = _unraisable
