"""``polytask recipes`` and ``polytask init``: the run configurations that ship inside the
package, listed one a line and copied into a folder to edit (as torchtune's ``ls`` and ``cp``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from polytask.cli.app import command, out
from polytask.run import recipes as shipped


@command
def recipes() -> None:
    """List the recipes that ship with polytask, one a line: `polytask train NAME` runs one,
    `polytask init NAME` copies it into a folder to edit."""
    listed = shipped.recipes()
    width = max(len(r.name) for r in listed)
    for recipe in listed:
        out.print(
            f"{recipe.name:<{width}}  {escape(recipe.summary)}",
            highlight=False,
            no_wrap=True,
            overflow="ellipsis",
        )


@command
def init(
    recipe: Annotated[str, typer.Argument(help="a recipe name (`polytask recipes`)")],
    directory: Annotated[
        Path, typer.Argument(help="the folder to copy it into (created if missing)")
    ] = Path("."),
) -> None:
    """Copy a recipe (and the example data it reads) into a folder to edit; existing files are
    never overwritten."""
    shipped.get_recipe(recipe)  # an unknown name is one line before anything is made
    copied = shipped.copy_recipe(recipe, directory)
    for path in copied:
        out.print(f"wrote {escape(str(path))}", highlight=False)
    where = "" if directory == Path(".") else f"cd {directory} && "
    out.print(f"next: {escape(where)}polytask train {copied[0].name}", highlight=False)
