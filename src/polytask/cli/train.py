"""``polytask train``: train (or resume) a run, print its test metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from polytask.cli.app import command, err, fail, stop_on_sigterm
from polytask.cli.results import print_results
from polytask.errors import PolytaskError, RunInterrupted
from polytask.run import resume_with_baselines, train_with_baselines
from polytask.run.recipes import load_recipe
from polytask.runtime import (
    is_main_process,
    launch,
    shutdown_distributed,
    torchrun_arguments,
    under_torchrun,
)


def _launch(command_line: list[str], **torchrun: object) -> None:
    """Re-run ``polytask`` with ``command_line`` under torchrun."""
    try:
        launch(torchrun_arguments(command=command_line, **torchrun))  # type: ignore[arg-type]
    except PolytaskError:
        raise
    except Exception as exc:  # torchrun reports a failed worker as ChildFailedError
        raise fail(f"distributed run failed: {' '.join(str(exc).split())[:500]}") from None


@command
def train(
    config: Annotated[
        str | None,
        typer.Argument(
            help="a YAML run configuration or a recipe's name (`polytask recipes`); "
            "omit with --resume"
        ),
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
    progress: Annotated[
        bool | None,
        typer.Option(
            "--progress/--no-progress", help="show the progress bar [default: train.progress]"
        ),
    ] = None,
    nproc_per_node: Annotated[
        int | None,
        typer.Option(help="data-parallel processes on this machine (launches torchrun + DDP)"),
    ] = None,
    nnodes: Annotated[str, typer.Option(help="number of machines (torchrun's --nnodes)")] = "1",
    node_rank: Annotated[int | None, typer.Option(help="this machine's rank")] = None,
    master_addr: Annotated[str | None, typer.Option(help="address of the rank-0 machine")] = None,
    master_port: Annotated[int | None, typer.Option(help="port of the rank-0 machine")] = None,
) -> None:
    """Train a multi-task model from a YAML file or a recipe and print each task's test metrics.

    CONFIG is a file's path or the name of a recipe that ships with polytask (`polytask
    recipes`); a file that exists wins.

    With --nproc-per-node N (and --nnodes, --node-rank, --master-addr, --master-port for several
    machines, as for torchrun) the run is launched through torch.distributed.run: N processes
    with DistributedDataParallel, gloo on CPU and NCCL on GPU; data.batch_size is per process.
    `torchrun -m polytask train CONFIG` works too."""
    stop_on_sigterm()
    if resume is not None and (config is not None or overrides):
        raise fail("--resume takes the run folder only; the config is the run's own")
    if resume is None and config is None:
        raise fail("give a config file or a recipe name (e.g. multi-digits) or --resume RUN_DIR")
    if nproc_per_node is not None and not under_torchrun():
        line = ["--resume", str(resume)] if resume else [str(config), *(overrides or [])]
        if single_task:
            line.append("--single-task")
        if progress is not None:
            line.append("--progress" if progress else "--no-progress")
        _launch(
            ["train", *line],
            nproc_per_node=nproc_per_node,
            nnodes=nnodes,
            node_rank=node_rank,
            master_addr=master_addr,
            master_port=master_port,
        )
        return
    if resume is not None:
        try:
            result = resume_with_baselines(resume, progress=progress)
        except KeyboardInterrupt:  # before its folder session: the checkpoints are as they were
            raise RunInterrupted.in_folder(resume) from None
    else:
        assert config is not None
        cfg = load_recipe(config, overrides or [])
        if is_main_process():
            err.print(f"run folder: {Path(cfg.output_dir) / cfg.name} (or the next free name)")
        result = train_with_baselines(
            cfg, progress=progress, baselines=True if single_task else None
        )
    if is_main_process():
        print_results(result)
    shutdown_distributed()
