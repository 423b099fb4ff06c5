"""``polytask tune``: search a configuration's methods, architectures and hyper-parameters
with Optuna."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from polytask.cli.app import command, err, out, stop_on_sigterm
from polytask.config import config_to_dict
from polytask.errors import RunInterrupted
from polytask.run.recipes import load_recipe
from polytask.tune.output import front_trials, trial_rows, trials_markdown, write_outputs
from polytask.tune.space import load_space
from polytask.tune.study import StudyResult, TuneSettings, run_study


@command
def tune(
    config: Annotated[str, typer.Argument(help="a YAML run configuration or a recipe's name")],
    space: Annotated[
        str,
        typer.Option(
            help="the search space: a YAML file, or a shipped space's name (e.g. mmoe-synthetic)"
        ),
    ],
    trials: Annotated[int, typer.Option(help="finished trials the study should hold")],
    objective: Annotated[
        str, typer.Option(help="deltam (maximise validation Δm%) or pareto (every task)")
    ] = "deltam",
    study: Annotated[
        str | None,
        typer.Option(help="the study's name; an existing study resumes (default: NAME-OBJECTIVE)"),
    ] = None,
    storage: Annotated[
        str | None,
        typer.Option(
            help="a SQLAlchemy URL, e.g. postgresql://user@host/db (default: an SQLite "
            "file study.db in the output folder)"
        ),
    ] = None,
    jobs: Annotated[int, typer.Option(help="trials in parallel processes on this machine")] = 1,
    output: Annotated[
        Path | None,
        typer.Option(help="the study's folder (default: the config's output_dir/tune-NAME)"),
    ] = None,
    pruner: Annotated[
        str, typer.Option(help="median, halving (successive halving) or none (deltam only)")
    ] = "median",
    overrides: Annotated[
        list[str] | None, typer.Argument(help="key=value overrides of the base configuration")
    ] = None,
    progress: Annotated[bool, typer.Option(help="show the progress bar")] = True,
) -> None:
    """Search a space of configurations around CONFIG with Optuna: each trial is a run folder,
    scored by validation Δm% over single-task baselines (trained once) or, with --objective
    pareto, by every task's validation metric. The study lives in --storage and resumes when run
    again with the same --study; several `polytask tune` processes (or --jobs) share it. Writes
    trials.csv/.md, importances.md, pareto.png and best.yaml (or front/*.yaml) to the output
    folder."""
    stop_on_sigterm()
    base = load_recipe(config, overrides or [])
    settings = TuneSettings(
        config=base,
        space=load_space(space, config_to_dict(base)),
        trials=trials,
        objective=objective,
        study_name=study,
        storage=storage,
        jobs=jobs,
        output_dir=output,
        pruner=pruner,
        progress=progress,
    )
    err.print(f"study {settings.name} in {settings.url}; trial folders under {settings.output}")
    try:
        result = _run(settings, progress)
    except (RunInterrupted, KeyboardInterrupt):
        raise RunInterrupted(
            f"interrupted; the study {settings.name} is in {settings.url}; continue with the same "
            f"command (--study {settings.name}"
            + (f" --storage {settings.storage}" if settings.storage else "")
            + ")"
        ) from None
    outputs = write_outputs(result)
    _summary(result)
    for path in [outputs.table_csv, outputs.table_markdown, outputs.importances, *outputs.configs]:
        err.print(f"wrote {path}", highlight=False)
    for extra in (outputs.plot, outputs.report):
        if extra is not None:
            err.print(f"wrote {extra}", highlight=False)


def _run(settings: TuneSettings, progress: bool) -> StudyResult:
    columns = (TextColumn("tune"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err, disable=not progress) as bar:
        task = bar.add_task("trials", total=settings.trials)
        return run_study(settings, on_trial=lambda done: bar.update(task, completed=done))


def _summary(result: StudyResult) -> None:
    rows = trial_rows(result)
    if result.runner.objective.multi:
        front = {t.number for t in front_trials(result)}
        shown = [r for r in rows if r["trial"] in front]
        out.print(f"Pareto front: {len(shown)} of {len(rows)} trials", highlight=False)
    else:
        shown = sorted((r for r in rows if r["state"] == "COMPLETE"), key=lambda r: -r["val Δm%"])[
            :5
        ]
        out.print(f"best of {len(rows)} trials (validation Δm%):", highlight=False)
    out.print(trials_markdown(shown, short=True), highlight=False, soft_wrap=True)
