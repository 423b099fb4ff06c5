"""The ``polytask`` command line: thin typer commands over the library.

Library code raises ``PolytaskError``s; only this module turns them into one red line and exit
code 1.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from polytask.errors import PolytaskError

app = typer.Typer(
    help="Multi-task learning for PyTorch: train, evaluate and predict with one model for "
    "several tasks.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True)


def _fail(message: str, code: int = 1) -> typer.Exit:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def _fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.4f}"


def print_results(result: Any) -> None:
    """The per-task test table, with single-task baselines and Δm% when present."""
    from polytask.evaluate import relative_gains

    table = Table(title=f"test metrics — {result.run_dir}")
    table.add_column("task")
    table.add_column("metric")
    table.add_column("multi-task", justify="right")
    gains: dict[str, dict[str, float]] = {}
    if result.baselines is not None:
        table.add_column("single-task", justify="right")
        table.add_column("gain %", justify="right")
        gains = relative_gains(result.test, result.baselines, result.tasks)
    for task in result.tasks:
        extra = [m for m in result.test[task.name] if m not in task.metric_names and m != "loss"]
        for i, metric in enumerate([*task.metric_names, *extra]):
            row = [task.name if i == 0 else "", metric, _fmt(result.test[task.name].get(metric))]
            if result.baselines is not None:
                row.append(_fmt(result.baselines.get(task.name, {}).get(metric)))
                gain = gains.get(task.name, {}).get(metric)
                row.append("—" if gain is None else f"{gain:+.2f}")
            table.add_row(*row)
        table.add_section()
    out.print(table)
    if result.delta_m is not None:
        out.print(
            f"[bold]Δm% = {result.delta_m:+.2f}[/] (mean relative gain of every metric over the "
            "single-task baselines; positive = multi-task is better)"
        )


@app.command()
def train(
    config: Annotated[
        str | None, typer.Argument(help="YAML run configuration (omit with --resume)")
    ] = None,
    overrides: Annotated[
        list[str] | None, typer.Argument(help="key=value overrides, e.g. train.epochs=3")
    ] = None,
    resume: Annotated[
        Path | None, typer.Option(help="continue the run in this folder from its last checkpoint")
    ] = None,
    single_task: Annotated[
        bool, typer.Option("--single-task", help="also train single-task baselines (Δm%)")
    ] = False,
    progress: Annotated[bool, typer.Option(help="show the progress bar")] = True,
    nproc_per_node: Annotated[
        int | None,
        typer.Option(help="data-parallel processes on this machine (launches torchrun + DDP)"),
    ] = None,
    nnodes: Annotated[str, typer.Option(help="number of machines (torchrun's --nnodes)")] = "1",
    node_rank: Annotated[int | None, typer.Option(help="this machine's rank")] = None,
    master_addr: Annotated[str | None, typer.Option(help="address of the rank-0 machine")] = None,
    master_port: Annotated[int | None, typer.Option(help="port of the rank-0 machine")] = None,
) -> None:
    """Train a multi-task model from a YAML file and print each task's test metrics.

    With --nproc-per-node N (and --nnodes, --node-rank, --master-addr, --master-port for several
    machines, as for torchrun) the run is launched through torch.distributed.run: N processes
    with DistributedDataParallel, gloo on CPU and NCCL on GPU; data.batch_size is per process.
    `torchrun -m polytask train CONFIG` works too."""
    import os

    from polytask.config import load_config
    from polytask.recipe import resume_run, train_from_config

    if nproc_per_node is not None and "WORLD_SIZE" not in os.environ:
        from polytask.train.distributed import launch, torchrun_arguments

        command = ["train"]
        if resume is not None:
            command += ["--resume", str(resume)]
        else:
            command += [c for c in [config, *(overrides or [])] if c is not None]
        if single_task:
            command.append("--single-task")
        if not progress:
            command.append("--no-progress")
        try:
            launch(
                torchrun_arguments(
                    nproc_per_node=nproc_per_node,
                    nnodes=nnodes,
                    node_rank=node_rank,
                    master_addr=master_addr,
                    master_port=master_port,
                    command=command,
                )
            )
        except PolytaskError as exc:
            raise _fail(str(exc)) from None
        except Exception as exc:  # torchrun reports a failed worker as ChildFailedError
            raise _fail(f"distributed run failed: {' '.join(str(exc).split())[:500]}") from None
        return

    try:
        if resume is not None:
            if config is not None or overrides:
                raise _fail("--resume takes the run folder only; the config is the run's own")
            result = resume_run(resume, progress=progress)
        else:
            if config is None:
                raise _fail(
                    "give a config file (e.g. configs/multi-digits.yaml) or --resume RUN_DIR"
                )
            cfg = load_config(config, overrides or [])
            if int(os.environ.get("RANK", "0")) == 0:
                err.print(f"run folder: {Path(cfg.output_dir) / cfg.name} (or the next free name)")
            result = train_from_config(
                cfg, progress=progress, baselines=True if single_task else None
            )
    except PolytaskError as exc:
        raise _fail(str(exc)) from None
    except KeyboardInterrupt:
        raise _fail(
            "interrupted; continue with: polytask train --resume <run folder>", code=130
        ) from None
    if int(os.environ.get("RANK", "0")) == 0:
        print_results(result)
    from polytask.train.distributed import shutdown_distributed

    shutdown_distributed()


@app.command()
def evaluate(
    run_dir: Annotated[Path, typer.Argument(help="a run folder made by `polytask train`")],
    baselines: Annotated[
        bool, typer.Option("--baselines", help="train missing single-task baselines for Δm%")
    ] = False,
) -> None:
    """Evaluate a run's best checkpoint on its test split."""
    from polytask.recipe import evaluate_run

    try:
        result = evaluate_run(run_dir, baselines=baselines)
    except PolytaskError as exc:
        raise _fail(str(exc)) from None
    print_results(result)


@app.command()
def predict(
    run_dir: Annotated[Path, typer.Argument(help="a run folder made by `polytask train`")],
    input: Annotated[Path, typer.Argument(help="CSV or Parquet file of inputs")],
    output: Annotated[Path, typer.Option("--output", "-o", help="CSV or Parquet file to write")],
    checkpoint: Annotated[str, typer.Option(help="best or last")] = "best",
) -> None:
    """Predict every task for each row of a CSV/Parquet file (one column per task out)."""
    from polytask.recipe import predict_file

    try:
        rows = predict_file(run_dir, input, output, checkpoint=checkpoint)
    except PolytaskError as exc:
        raise _fail(str(exc)) from None
    err.print(f"wrote {rows} predictions to {output}")


@app.command()
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
    output_dir: Annotated[Path, typer.Option(help="where the runs go (--methods)")] = Path("runs"),
    progress: Annotated[bool, typer.Option(help="show progress bars")] = False,
) -> None:
    """Compare runs: either existing run folders (test metrics, mean ± std over runs sharing a
    configuration name), or, with one CONFIG and --methods a,b,c, train each method over --seeds
    seeds plus the single-task baselines once and rank the methods by Δm%."""
    import json

    from polytask.evaluate import comparison_markdown, summarize_groups
    from polytask.recipe import read_run_config

    if methods is not None:
        from polytask.compare import compare_methods, comparison_table, write_comparison
        from polytask.config import load_config

        if len(targets) != 1 or not targets[0].is_file():
            raise _fail("--methods takes one config file, e.g. configs/multi-digits.yaml")
        names = [m.strip() for m in methods.split(",") if m.strip()]
        try:
            from polytask.balancing import BALANCERS

            unknown = [m for m in names if m not in BALANCERS]
            if unknown:
                raise _fail(
                    f"--methods: unknown balancing method(s) {', '.join(unknown)}; known: "
                    f"{', '.join(BALANCERS.names())}"
                )
            config = load_config(targets[0])
            comparison = compare_methods(
                config, names, seeds=seeds, output_dir=output_dir, progress=progress
            )
        except PolytaskError as exc:
            raise _fail(str(exc)) from None
        out.print(comparison_table(comparison))
        write_comparison(comparison, markdown=markdown, csv_path=csv, plot=plot)
        return

    groups: dict[str, list[dict[str, dict[str, float]]]] = {}
    try:
        for run_dir in targets:
            name = read_run_config(run_dir).name
            results = run_dir / "results.json"
            if not results.is_file():
                raise PolytaskError(f"{run_dir}: no results.json (did the run finish?)")
            groups.setdefault(name, []).append(json.loads(results.read_text())["test"])
    except PolytaskError as exc:
        raise _fail(str(exc)) from None
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
        markdown.write_text(text + "\n")
        err.print(f"wrote {markdown}")


@app.command()
def datasets() -> None:
    """List the built-in datasets."""
    from polytask.data.sources import DATASETS

    table = Table(title="datasets")
    table.add_column("name")
    table.add_column("description")
    for entry in DATASETS:
        table.add_row(entry.name, entry.description)
    out.print(table)


@app.command()
def methods() -> None:
    """List every registered component: balancing methods, architectures, encoders, heads,
    datasets, samplers."""
    from polytask.balancing import BALANCERS
    from polytask.data.mixing import SAMPLERS
    from polytask.data.sources import DATASETS
    from polytask.models import ARCHITECTURES, ENCODERS, HEADS

    registries = {
        "balancing": BALANCERS,
        "architecture": ARCHITECTURES,
        "encoder": ENCODERS,
        "head": HEADS,
        "dataset": DATASETS,
        "sampler": SAMPLERS,
    }
    table = Table(title="registered components")
    table.add_column("kind")
    table.add_column("name")
    table.add_column("description")
    for kind, registry in registries.items():
        for entry in registry:
            table.add_row(kind, entry.name, entry.description)
        table.add_section()
    out.print(table)


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except PolytaskError as exc:  # pragma: no cover - commands catch their own
        err.print(f"[bold red]error:[/] {exc}")
        sys.exit(1)
