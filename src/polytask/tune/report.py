"""The study as one self-contained HTML page (``report.html`` in the study's folder), in the
style of ``polytask report``: the trials table, the Pareto front of every pair of tasks, the
parameter importances and the ready configurations — plots embedded, no external resource."""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from polytask.analysis.html import html_page, note, png_html, section, table
from polytask.io import write_text_atomic

__all__ = ["study_report"]


def _trials_section(rows: Sequence[Mapping[str, Any]]) -> str:
    if not rows:
        return section("Trials", note("The study has no trials yet."))
    columns = [c for c in rows[0] if c != "run folder"]
    body = [[row.get(c, "") for c in columns] for row in rows]
    return section(
        "Trials",
        note("One row per trial; each trial is a run folder under trials/ (see trials.csv)."),
        table(columns, body),
    )


def _front_section(plot: Path | None, front: Sequence[int]) -> str:
    listed = note(
        "Trials on the front (no other trial is at least as good on every task's primary "
        f"validation metric and better on one): {', '.join(map(str, front)) or 'none'}."
    )
    if plot is None or not plot.is_file():
        return section("Pareto front", listed, note("No plot: fewer than two tasks or trials."))
    return section("Pareto front", listed, png_html(plot.read_bytes(), "Pareto front"))


def _importances_section(found: Mapping[str, Mapping[str, float]] | str) -> str:
    if isinstance(found, str):
        return section("Parameter importances", note(f"Not available: {found}."))
    parts = [note("fANOVA importances per objective; they sum to 1.")]
    for label, values in found.items():
        parts.append(f"<h3>{html.escape(label)}</h3>")
        parts.append(table(["parameter", "importance"], list(values.items()), digits=3))
    return section("Parameter importances", *parts)


def _configs_section(configs: Sequence[Path]) -> str:
    if not configs:
        return section("Configurations", note("No complete trial yet."))
    parts = [note("Ready for `polytask train FILE`.")]
    for path in configs:
        parts.append(f"<h3>{html.escape(path.name)}</h3>")
        parts.append(f"<pre>{html.escape(path.read_text(encoding='utf-8'))}</pre>")
    return section("Configurations", *parts)


def study_report(
    path: Path,
    *,
    name: str,
    rows: Sequence[Mapping[str, Any]],
    front: Sequence[int],
    importances: Mapping[str, Mapping[str, float]] | str,
    plot: Path | None,
    configs: Sequence[Path],
) -> Path:
    """Write the study's HTML report to ``path`` (atomically) and return it."""
    sections = [
        _trials_section(rows),
        _front_section(plot, front),
        _importances_section(importances),
        _configs_section(configs),
    ]
    page = html_page(f"polytask tune: study {name}", sections, subtitle=f"{len(rows)} trials")
    write_text_atomic(path, page)
    return path
