"""The ``polytask`` command line: one module per command, thin typer functions over the library.

Every command is registered with ``polytask.cli.app.command``, which also turns the library's
``PolytaskError`` into one red line and exit code 1 (``reports_errors``).
"""

from polytask.cli import (
    affinity,
    catalogue,
    compare,
    compress,
    distill,
    evaluate,
    export,
    predict,
    recipes,
    report,
    serve,
    train,
    tune,
)
from polytask.cli.app import app, main

__all__ = [
    "affinity",
    "app",
    "catalogue",
    "compare",
    "compress",
    "distill",
    "evaluate",
    "export",
    "main",
    "predict",
    "recipes",
    "report",
    "serve",
    "train",
    "tune",
]
