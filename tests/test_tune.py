"""``polytask tune``: the search space parser, a study end to end with a crash and a resume,
the Pareto front, pruning and parallel workers."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import html5lib
import optuna
import pytest
import yaml
from typer.testing import CliRunner

from polytask.cli import app
from polytask.config import config_to_dict, load_config, parse_config
from polytask.errors import ConfigError
from polytask.tune import (
    TuneSettings,
    dominates,
    load_space,
    pareto_front,
    parse_space,
    run_study,
    write_outputs,
)
from polytask.tune.parallel import threads_per_job
from polytask.tune.space import SPACES_DIR

optuna.logging.set_verbosity(optuna.logging.WARNING)

#: two regression tasks, 2 epochs of 5 batches: a trial trains in about a second
BASE: dict[str, Any] = {
    "name": "tiny",
    "seed": 0,
    "data": {
        "dataset": "mmoe-synthetic",
        "params": {"num_samples": 400, "input_dim": 8},
        "batch_size": 64,
    },
    "model": {"encoder": "mlp", "encoder_params": {"hidden": [8]}},
    "balancing": {"method": "uncertainty"},
    "optimizer": {"name": "adamw", "lr": 0.01},
    "train": {"epochs": 2, "progress": False},
}

SPACE: dict[str, Any] = {
    "optimizer.lr": {"log_uniform": [1.0e-3, 3.0e-2]},
    "balancing.method": {
        "choice": {"equal": {}, "nash_mtl": {"balancing.params.update_every": {"int": [1, 3]}}}
    },
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One output folder for the module's studies: the Δm% baselines are trained once."""
    return tmp_path_factory.mktemp("tune")


def base_config(folder: Path) -> Any:
    raw = copy.deepcopy(BASE)
    raw["output_dir"] = str(folder / "runs")
    return parse_config(raw)


def settings(folder: Path, space: dict[str, Any], **options: Any) -> TuneSettings:
    config = base_config(folder)
    return TuneSettings(
        config=config,
        space=parse_space(space, config_to_dict(config)),
        output_dir=folder / "out",
        progress=False,
        **options,
    )


# ----------------------------------------------------------------------------- the space
@pytest.mark.parametrize(
    ("space", "message"),
    [
        ({}, "must be a mapping of dotted config fields"),
        ([1, 2], "found list"),
        ({"optimizer.rate": {"uniform": [0, 1]}}, "optimizer.rate: unknown config field"),
        ({"nonsense": {"uniform": [0, 1]}}, "'nonsense' is not a field of the configuration"),
        ({"optimizer": {"choice": [1]}}, "optimizer is a section"),
        ({"optimizer.lr.x": {"uniform": [0, 1]}}, "optimizer.lr has no sub-fields"),
        ({"optimizer.lr": 0.1}, "optimizer.lr: expected one of"),
        ({"optimizer.lr": {"normal": [0, 1]}}, "optimizer.lr: expected one of"),
        ({"optimizer.lr": {"uniform": [0.1]}}, "uniform takes [low, high] (two numbers)"),
        ({"optimizer.lr": {"uniform": ["a", "b"]}}, "uniform takes [low, high]"),
        ({"optimizer.lr": {"uniform": [0.1, 0.01]}}, "needs finite low < high"),
        ({"optimizer.lr": {"log_uniform": [0, 0.1]}}, "log_uniform needs low > 0"),
        ({"train.epochs": {"int": [1.5, 3]}}, "int takes whole numbers"),
        ({"model.architecture": {"choice": []}}, "choice needs at least one option"),
        ({"model.architecture": {"choice": ["mmoe", "mmoe"]}}, "lists 'mmoe' more than once"),
        ({"model.architecture": {"choice": "mmoe"}}, "choice takes a list of options"),
        (
            {"balancing.method": {"choice": {"famo": 3}}},
            "option 'famo' maps to 3; expected a sub-space",
        ),
        (
            {"model.architecture": {"choice": ["hard_sharing", "nope"]}},
            "model.architecture: 'nope' makes an invalid config (model.architecture: unknown "
            "architecture 'nope'",
        ),
        ({"data.batch_size": {"int": [-4, 8]}}, "data.batch_size: -4 makes an invalid config"),
        (
            {
                "balancing.method": {
                    "choice": {"nash_mtl": {"balancing.params.bogus": {"int": [1, 2]}}}
                }
            },
            "balancing.params.bogus: 1 with balancing.method='nash_mtl' makes an invalid config "
            "(balancing.params: unknown parameter 'bogus'",
        ),
        (
            {
                "optimizer.lr": {"uniform": [0.01, 0.1]},
                "balancing.method": {"choice": {"equal": {"optimizer.lr": {"uniform": [0, 1]}}}},
            },
            "optimizer.lr: searched more than once with different distributions",
        ),
    ],
)
def test_every_space_error_names_its_field(space: Any, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_space(space, {**BASE}, source="space.yaml")
    assert str(caught.value).startswith("space.yaml: ")
    assert message in str(caught.value)


def test_every_problem_in_one_message(tmp_path: Path) -> None:
    path = tmp_path / "space.yaml"
    path.write_text(
        "optimizer.rate: {uniform: [0, 1]}\n"
        "optimizer.lr: {log_uniform: [0, 1]}\n"
        "model.architecture: {choice: [nope]}\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_space(path, BASE)
    text = str(caught.value)
    assert text.startswith(f"{path}: 3 problems:")
    for name in ("optimizer.rate", "optimizer.lr", "model.architecture"):
        assert f"  - {name}: " in text
    path.write_text("optimizer.lr: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_space(path, BASE)
    with pytest.raises(ConfigError, match="no such search space file"):
        load_space(tmp_path / "missing.yaml", BASE)


def test_sampling_conditional_parameters_and_ready_configs() -> None:
    space = parse_space(
        {
            **SPACE,
            "model.encoder_params.hidden": {"choice": [[8], [16, 8]]},  # lists: stored as JSON
            "data.task_weights.t1": {"uniform": [0.5, 2.0]},
        },
        BASE,
    )
    trial = optuna.trial.FixedTrial(
        {
            "optimizer.lr": 0.01,
            "balancing.method": "nash_mtl",
            "balancing.params.update_every": 2,
            "model.encoder_params.hidden": "[16, 8]",
            "data.task_weights.t1": 1.5,
        }
    )
    values = space.sample(trial)
    assert values["balancing.params.update_every"] == 2
    assert values["model.encoder_params.hidden"] == [16, 8]
    config = space.config(BASE, values, source="trial")
    assert config.balancing.method == "nash_mtl"
    assert config.balancing.params == {"update_every": 2}  # uncertainty's params dropped
    assert config.model.encoder_params["hidden"] == [16, 8]
    assert config.data.task_weights == {"t1": 1.5}
    equal = space.sample(
        optuna.trial.FixedTrial(
            {
                "optimizer.lr": 0.01,
                "balancing.method": "equal",
                "model.encoder_params.hidden": "[8]",
                "data.task_weights.t1": 1.0,
            }
        )
    )
    assert "balancing.params.update_every" not in equal  # only under nash_mtl
    assert space.values_of(trial.params) == values
    assert space.fields()[:3] == [
        "optimizer.lr",
        "balancing.method",
        "balancing.params.update_every",
    ]


def test_the_shipped_space_is_valid() -> None:
    from polytask.run.recipes import load_recipe

    shipped = sorted(SPACES_DIR.glob("*.yaml"))
    assert shipped
    for path in shipped:
        space = load_space(path.stem, config_to_dict(load_recipe(path.stem)))
        assert "balancing.method" in space.fields()


# ----------------------------------------------------------------------------- Pareto front
def test_pareto_front_by_hand_equals_optunas_best_trials() -> None:
    # maximise accuracy, minimise RMSE
    directions = ["maximize", "minimize"]
    points = [
        [0.90, 2.0],  # 0: on the front (best accuracy)
        [0.80, 1.0],  # 1: on the front (best RMSE)
        [0.85, 1.5],  # 2: on the front (between 0 and 1)
        [0.80, 1.6],  # 3: dominated by 2 (less accurate, larger RMSE)
        [0.90, 2.1],  # 4: dominated by 0 (same accuracy, larger RMSE)
        [0.70, 0.9],  # 5: on the front (smallest RMSE)
        [0.84, 1.5],  # 6: dominated by 2 (same RMSE, less accurate)
    ]
    assert dominates(points[2], points[3], directions)
    assert not dominates(points[0], points[1], directions)
    assert not dominates(points[0], points[0], directions)
    assert pareto_front(points, directions) == [0, 1, 2, 5]
    study = optuna.create_study(directions=directions)
    dist = {"x": optuna.distributions.FloatDistribution(0, 1)}
    for i, values in enumerate(points):
        study.add_trial(
            optuna.trial.create_trial(params={"x": i / 10}, distributions=dist, values=values)
        )
    assert sorted(t.number for t in study.best_trials) == pareto_front(points, directions)
    three = [[1, 1, 1], [1, 1, 0], [0, 2, 0], [float("nan"), 9, 9]]
    assert pareto_front(three, ["maximize"] * 3) == [0, 2]


# ----------------------------------------------------------------------------- studies
class SimulatedCrash(RuntimeError):
    pass


def _crash_after(n: int) -> Any:
    def on_trial(done: int) -> None:
        if done >= n:
            raise SimulatedCrash(f"crashed after {done} trials")

    return on_trial


def test_study_crashes_after_four_trials_and_resumes_to_six(folder: Path) -> None:
    first = settings(folder, SPACE, trials=10, study_name="resumed", pruner="none")
    with pytest.raises(SimulatedCrash):
        run_study(first, on_trial=_crash_after(4))
    database = folder / "out" / "study.db"
    assert database.is_file()  # the default storage: SQLite in the output folder
    url = f"sqlite:///{database}"
    before = optuna.load_study(study_name="resumed", storage=url).trials
    assert [t.state.name for t in before] == ["COMPLETE"] * 4
    results = {t.number: Path(t.user_attrs["run_dir"], "results.json").read_text() for t in before}

    resumed = run_study(settings(folder, SPACE, trials=6, study_name="resumed", pruner="none"))
    after = resumed.study.trials
    assert [t.state.name for t in after] == ["COMPLETE"] * 6
    for old, new in zip(before, after[:4], strict=True):  # the earlier trials are untouched
        assert (new.values, new.params, new.user_attrs) == (old.values, old.params, old.user_attrs)
        assert Path(new.user_attrs["run_dir"], "results.json").read_text() == results[old.number]
    assert after[4].params != after[0].params  # the resumed sampler does not replay the start

    # each trial is a run folder with its test Δm% against the cached baselines
    run = Path(after[5].user_attrs["run_dir"])
    saved = json.loads((run / "results.json").read_text())
    assert saved["delta_m"] == pytest.approx(after[5].user_attrs["test_delta_m"])
    assert load_config(run / "config.yaml").name == "trial-0005"
    assert (folder / "out" / "baselines" / "t1" / "results.json").is_file()

    outputs = write_outputs(resumed)
    best = load_config(outputs.configs[0])  # a ready configuration for `polytask train`
    assert best.name == "tiny-tuned"
    best_trial = resumed.study.best_trial
    assert best.optimizer.lr == pytest.approx(best_trial.params["optimizer.lr"])
    lines = outputs.table_csv.read_text().splitlines()
    assert len(lines) == 7 and lines[0].startswith("trial,state,val Δm%")
    assert "optimizer.lr" in outputs.importances.read_text()
    assert outputs.plot is not None and outputs.plot.stat().st_size > 0
    # the same content on one self-contained HTML page
    assert outputs.report is not None
    page = outputs.report.read_text()
    html5lib.HTMLParser(strict=True).parse(page)
    for title in ("Trials", "Pareto front", "Parameter importances", "Configurations"):
        assert f"<h2>{title}</h2>" in page
    assert "data:image/png;base64," in page and "tiny-tuned" in page
    assert "http://" not in page and "https://" not in page


def test_pruning_stops_a_bad_trial(folder: Path) -> None:
    space = {"optimizer.lr": {"log_uniform": [1.0e-6, 5.0e-2]}}
    chosen = settings(
        folder, space, trials=2, study_name="pruned", pruner="median", pruner_startup_trials=1
    )
    study = optuna.create_study(study_name="pruned", storage=chosen.url, direction="maximize")
    study.enqueue_trial({"optimizer.lr": 0.03})  # trains well
    study.enqueue_trial({"optimizer.lr": 1.0e-6})  # barely moves: worse than the median
    result = run_study(chosen)
    states = [t.state.name for t in result.study.trials]
    assert states == ["COMPLETE", "PRUNED"]
    pruned = result.study.trials[1]
    assert pruned.user_attrs["pruned_at_epoch"] == 1
    assert list(pruned.intermediate_values) == [1]
    assert Path(pruned.user_attrs["run_dir"], "checkpoints", "last.safetensors").is_file()


def test_pareto_objective_with_two_jobs_from_the_cli(folder: Path) -> None:
    config = folder / "tiny.yaml"
    config.write_text(yaml.safe_dump({**BASE, "output_dir": str(folder / "runs")}))
    space = folder / "space.yaml"
    space.write_text(yaml.safe_dump({"optimizer.lr": {"log_uniform": [1.0e-3, 3.0e-2]}}))
    output = folder / "pareto"
    result = CliRunner().invoke(
        app,
        [
            "tune", str(config), "--space", str(space), "--trials", "2", "--objective", "pareto",
            "--jobs", "2", "--output", str(output), "--no-progress",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "Pareto front:" in result.output
    study = optuna.load_study(study_name="tiny-pareto", storage=f"sqlite:///{output}/study.db")
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert 2 <= len(complete) <= 3  # two workers: at most one trial more than asked
    assert len({t.user_attrs["run_dir"] for t in complete}) == len(complete)
    assert study.directions == [optuna.study.StudyDirection.MINIMIZE] * 2  # RMSE of t1, t2
    fronts = sorted(p.name for p in (output / "front").iterdir())
    assert fronts == [
        f"trial-{t.number:04d}.yaml" for t in sorted(study.best_trials, key=lambda t: t.number)
    ]
    assert (output / "pareto.png").is_file()
    # the non-dominated filter on the trials' values is Optuna's front
    front = pareto_front([t.values for t in complete], ["minimize", "minimize"])
    assert {complete[i].number for i in front} == {t.number for t in study.best_trials}
    assert threads_per_job(2, cores=2) == 1 and threads_per_job(2, cores=16) == 8


def test_resuming_with_another_objective_is_refused(folder: Path) -> None:
    chosen = settings(folder, SPACE, trials=1, study_name="resumed", objective="pareto")
    with pytest.raises(ConfigError, match=r"--study resumed: the study in .* optimises"):
        run_study(chosen)
    with pytest.raises(ConfigError, match=r"--objective: 'best'.*--jobs: at least 1"):
        settings(folder, SPACE, trials=1, objective="best", jobs=0)


def test_the_cli_reports_a_bad_space_before_training(tmp_path: Path) -> None:
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({**BASE, "output_dir": str(tmp_path / "runs")}))
    space = tmp_path / "space.yaml"
    space.write_text("optimizer.lr: {log_uniform: [0, 1]}\n")
    result = CliRunner().invoke(
        app, ["tune", str(config), "--space", str(space), "--trials", "2", "--no-progress"]
    )
    assert result.exit_code == 1
    assert f"error: {space}: optimizer.lr: log_uniform needs low > 0" in " ".join(
        result.output.split()
    )
    assert not (tmp_path / "runs").exists()  # nothing trained, nothing written
