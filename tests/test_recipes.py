"""The recipes that ship inside the package: ``polytask recipes``, ``polytask init``,
``polytask train <recipe name>``, ``--version``, and the clone's ``configs/`` and ``examples/``
that must stay the packaged files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import polytask
from polytask.cli import app
from polytask.errors import ConfigError
from polytask.run.recipes import RECIPES_DIR, get_recipe, load_recipe, recipe_names, resolve

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
SMALL_DIGITS = [
    "train.epochs=1",
    "data.params.num_train=200",
    "data.params.num_val=50",
    "data.params.num_test=50",
    "evaluate.baselines=false",
]


def run(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def test_version() -> None:
    result = run("--version")
    assert result.exit_code == 0
    assert result.output.strip() == f"polytask {polytask.__version__}"


def test_recipes_lists_every_recipe_one_line_each() -> None:
    result = run("recipes")
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert [line.split()[0] for line in lines] == recipe_names()
    packaged = Path(polytask.__file__).parent / "recipes"
    assert len(lines) == len(list(packaged.glob("*.yaml"))) and "multi-digits" in recipe_names()
    assert all(len(line.split(maxsplit=1)) == 2 for line in lines)  # each has a summary


def test_clone_configs_and_examples_are_the_packaged_files() -> None:
    """configs/*.yaml and examples/ are links to (or byte copies of) the packaged recipes and
    data: nothing to keep in step by hand, and no recipe on one side only."""
    configs = {p.name: p.read_bytes() for p in (ROOT / "configs").glob("*.yaml")}
    packaged = {p.name: p.read_bytes() for p in RECIPES_DIR.glob("*.yaml")}
    assert configs == packaged
    for recipe in map(get_recipe, recipe_names()):
        for data in recipe.data_files:
            assert (ROOT / data).read_bytes() == (RECIPES_DIR / data).read_bytes()


def test_init_copies_the_recipe_and_its_data_and_never_overwrites(tmp_path: Path) -> None:
    target = tmp_path / "mine"
    result = run("init", "students-csv", target)
    assert result.exit_code == 0, result.output
    assert (target / "students-csv.yaml").read_bytes() == get_recipe(
        "students-csv"
    ).path.read_bytes()
    csv = target / "examples" / "students.csv"
    assert csv.read_bytes() == (RECIPES_DIR / "examples" / "students.csv").read_bytes()

    csv.write_text("edited\n")
    again = run("init", "students-csv", target)
    assert again.exit_code == 1 and "exists already" in again.output
    assert csv.read_text() == "edited\n"  # nothing overwritten

    assert run("init", "multi-digits", target).exit_code == 0  # a recipe without data files
    assert sorted(p.name for p in target.iterdir()) == [
        "examples",
        "multi-digits.yaml",
        "students-csv.yaml",
    ]


def test_initialised_recipe_trains_from_its_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert run("init", "students-csv", tmp_path).exit_code == 0
    monkeypatch.chdir(tmp_path)
    result = run("train", "students-csv.yaml", "train.epochs=1", "--no-progress")
    assert result.exit_code == 0, result.output
    saved = yaml.safe_load((tmp_path / "runs" / "students" / "config.yaml").read_text())
    assert saved["data"]["params"]["path"] == "examples/students.csv"


@pytest.mark.parametrize("args", [("init", "nope"), ("train", "nope")])
def test_unknown_recipe_is_one_line_listing_the_recipes(args: tuple[str, ...]) -> None:
    result = run(*args)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert "unknown recipe 'nope'" in result.output and "multi-digits" in result.output


def test_train_a_recipe_by_name(tmp_path: Path) -> None:
    result = run("train", "multi-digits", *SMALL_DIGITS, f"output_dir={tmp_path}", "--no-progress")
    assert result.exit_code == 0, result.output
    assert set(json.loads((tmp_path / "multi-digits" / "results.json").read_text())["test"]) >= {
        "left",
        "sum",
    }


def test_a_file_based_recipe_by_name_reads_its_packaged_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no examples/ here
    config = load_recipe("students-csv", ["train.epochs=1"])
    assert Path(config.data.params["path"]) == RECIPES_DIR / "examples" / "students.csv"
    result = run("train", "students-csv", "train.epochs=1", "--no-progress")
    assert result.exit_code == 0, result.output


def test_an_existing_path_wins_over_a_recipe_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    Path("multi-digits").write_text("name: mine\ndata: {dataset: mmoe-synthetic}\n")
    path, recipe = resolve("multi-digits")
    assert recipe is None and path == Path("multi-digits")
    assert load_recipe("multi-digits").name == "mine"
    assert resolve("configs/multi-digits.yaml")[1] is None  # a path is never a recipe
    with pytest.raises(ConfigError, match="no such config file"):
        load_recipe("configs/missing.yaml")
