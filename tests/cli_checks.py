"""What the CLI tests check about a failed command's output (imported by the test modules)."""

from __future__ import annotations

from typing import Any


def one_error_line(result: Any) -> str:
    """The one ``error:`` line of a command that failed with exit code 1 and no traceback."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    return errors[0]
