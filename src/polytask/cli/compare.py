"""``polytask compare``: finished runs side by side, or methods × seeds trained and ranked."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from polytask.analysis.report import write_comparison_report
from polytask.balancing import BALANCERS
from polytask.cli.app import command, err, out
from polytask.config import load_config
from polytask.errors import ConfigError, unknown_name
from polytask.evaluate import comparison_markdown, summarize_groups
from polytask.io import write_text_atomic
from polytask.run import RunFolder, compare_methods, comparison_table, write_comparison


@command
def compare(
    targets: Annotated[
        list[Path],
        typer.Argument(help="run folders to compare, or ONE config file with --methods"),
    ],
    methods: Annotated[
        str | None,
        typer.Option(help="with a config: comma-separated balancing methods to train and compare"),
    ] = None,
    seeds: Annotated[int, typer.Option(help="with --methods: seeds per method")] = 3,
    markdown: Annotated[Path | None, typer.Option(help="write the table as Markdown")] = None,
    csv: Annotated[Path | None, typer.Option(help="write every result as CSV (--methods)")] = None,
    plot: Annotated[Path | None, typer.Option(help="write a Δm% bar chart PNG (--methods)")] = None,
    report: Annotated[
        Path | None,
        typer.Option(help="write a self-contained HTML report with error bars (--methods)"),
    ] = None,
    output_dir: Annotated[Path, typer.Option(help="where the runs go (--methods)")] = Path("runs"),
    progress: Annotated[bool, typer.Option(help="show progress bars")] = False,
) -> None:
    """Compare runs: either existing run folders (test metrics, mean ± std over runs sharing a
    configuration name), or, with one CONFIG and --methods a,b,c, train each method over --seeds
    seeds plus the single-task baselines once and rank the methods by Δm%."""
    if methods is None:
        _compare_folders(targets, markdown)
        return
    if len(targets) != 1 or not targets[0].is_file():
        raise ConfigError("--methods takes one config file, e.g. configs/multi-digits.yaml")
    names = [m.strip() for m in methods.split(",") if m.strip()]
    unknown = [m for m in names if m not in BALANCERS]
    if unknown:
        raise ConfigError(
            f"--methods: {unknown_name('balancing method', unknown, BALANCERS.names())}"
        )
    comparison = compare_methods(
        load_config(targets[0]), names, seeds=seeds, output_dir=output_dir, progress=progress
    )
    out.print(comparison_table(comparison))
    write_comparison(comparison, markdown=markdown, csv_path=csv, plot=plot)
    if report is not None:
        err.print(f"wrote {write_comparison_report(comparison, report)}")


def _compare_folders(folders: list[Path], markdown: Path | None) -> None:
    groups: dict[str, list[dict[str, dict[str, float]]]] = {}
    for path in folders:
        folder = RunFolder(path)
        name = folder.read_config().name
        groups.setdefault(name, []).append(folder.read_results()["test"])
    summary = summarize_groups(groups)
    table = Table(title="test metrics (mean ± std over runs)")
    table.add_column("task")
    table.add_column("metric")
    for label in summary:
        table.add_column(f"{label} (n={len(groups[label])})", justify="right")
    text = comparison_markdown(summary)
    for line in text.splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        table.add_row(cells[0], cells[1], *[c.split(" (n=")[0] for c in cells[2:]])
    out.print(table)
    if markdown is not None:
        write_text_atomic(markdown, text + "\n")
        err.print(f"wrote {markdown}")
