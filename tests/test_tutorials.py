"""The tutorials (docs/tutorials/NN-*.md) are jupytext Markdown notebooks: each parses, has code,
and ends with a plot. Executing them is scripts/ci/30-tutorials.sh's job, not the test suite's."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

jupytext = pytest.importorskip("jupytext", reason="the `tutorials` extra is not installed")

TUTORIALS = sorted((Path(__file__).parents[1] / "docs" / "tutorials").glob("[0-9][0-9]-*.md"))


def test_the_five_tutorials_exist() -> None:
    assert len(TUTORIALS) >= 5, [p.name for p in TUTORIALS]


@pytest.mark.parametrize("path", TUTORIALS, ids=lambda p: p.stem)
def test_tutorial_parses_and_ends_with_a_plot(path: Path) -> None:
    notebook = jupytext.read(path)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert len(code) >= 3, f"{path.name}: only {len(code)} code cells"
    assert notebook.cells[0].cell_type == "markdown"
    assert notebook.cells[0].source.lstrip().startswith("# "), f"{path.name}: no title"
    for cell in code:  # every code cell is valid Python (magics aside)
        source = "\n".join(
            line for line in cell.source.splitlines() if not line.lstrip().startswith(("%", "!"))
        )
        compile(source, f"{path.name} cell", "exec")
    last = code[-1].source
    assert "plt.show()" in last, f"{path.name}: the last code cell does not show a plot"
    figure = re.search(r"\bplt\.(subplots|figure)\(", last)
    assert figure, f"{path.name}: the last code cell makes no figure"
