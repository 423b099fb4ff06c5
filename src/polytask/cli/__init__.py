"""The ``polytask`` command line: one module per command, thin typer functions over the library.

Every command is registered with ``polytask.cli.app.command``, which also turns the library's
``PolytaskError`` into one red line and exit code 1 (``reports_errors``).
"""

from polytask.cli import catalogue, compare, evaluate, predict, recipes, train
from polytask.cli.app import app, main

__all__ = ["app", "catalogue", "compare", "evaluate", "main", "predict", "recipes", "train"]
