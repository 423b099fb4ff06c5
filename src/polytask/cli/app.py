"""The typer application, its consoles, and the one place where errors become exit codes.

Library code raises ``PolytaskError``s; ``reports_errors`` (applied to every command by
``command``) turns them, and any ``OSError`` (a file that cannot be read or written), into one red
line naming the file and exit code 1, and Ctrl-C (or SIGTERM, see ``stop_on_sigterm``) into exit
code 130.
"""

from __future__ import annotations

import functools
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.console import Console

from polytask import __version__
from polytask.errors import PolytaskError
from polytask.runtime import interrupts

F = TypeVar("F", bound=Callable[..., Any])

app = typer.Typer(
    help="Multi-task learning for PyTorch: train, evaluate and predict with one model for "
    "several tasks.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True)


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print ``message`` as one red error line; the ``Exit`` to raise."""
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def reports_errors(function: F) -> F:
    """Run a command, turning ``PolytaskError`` into one line and exit 1, Ctrl-C into 130."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except PolytaskError as exc:
            raise fail(str(exc), code=getattr(exc, "exit_code", 1)) from None
        except OSError as exc:  # a file that cannot be read or written: name it
            where = f"{exc.filename}: " if exc.filename else ""
            raise fail(f"{where}{exc.strerror or exc}") from None
        except KeyboardInterrupt:  # a run in its folder says how to resume (RunInterrupted)
            raise fail("interrupted before anything was written", code=130) from None
        finally:
            interrupts.clear_stop_request()  # acted on, or the command ended anyway

    return wrapper  # type: ignore[return-value]


def _interrupt(signum: int, frame: object) -> None:
    interrupts.request_stop(signum)  # kept even if a finalizer swallows the exception below
    raise KeyboardInterrupt


def stop_on_sigterm() -> None:
    """Handle SIGTERM (a scheduler or ``kill`` stopping the job) like Ctrl-C: the run stops
    cleanly, says where it is and how to resume it. Both are recorded as a stop request, so one
    that lands inside a finalizer (where Python ignores the exception) still stops the loop at
    its next step (``polytask.runtime.interrupts``)."""
    if threading.current_thread() is threading.main_thread():
        interrupts.quiet_swallowed_interrupts()
        signal.signal(signal.SIGTERM, _interrupt)
        signal.signal(signal.SIGINT, _interrupt)


def command(function: F) -> F:
    """Register ``function`` as a command of ``app`` (its docstring is its ``--help``)."""
    app.command()(reports_errors(function))
    return function


def _print_version(value: bool) -> None:
    if value:
        out.print(f"polytask {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _options(
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="print the version"
    ),
) -> None:
    """Multi-task learning for PyTorch: train, evaluate and predict with one model for several
    tasks."""


def main() -> None:
    """Console-script entry point; an interrupt outside a command (while the interpreter starts
    or finishes) exits quietly with code 130."""
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
