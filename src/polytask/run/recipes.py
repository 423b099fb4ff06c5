"""The recipes that ship inside the package: ready-made run configurations, by name.

A recipe is ``polytask/recipes/<name>.yaml``; the files it reads (``students-csv`` reads
``examples/students.csv``) lie next to it at the same relative path, so that the path in the YAML
works from a clone (``configs/`` and ``examples/`` are links to these files), from a folder that
``copy_recipe`` filled, and for the packaged recipe itself (``load_recipe`` points it at the
packaged file).

>>> "multi-digits" in recipe_names()
True
>>> [str(p) for p in get_recipe("students-csv").data_files]
['examples/students.csv']
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from polytask.config import RunConfig, load_config
from polytask.errors import ConfigError, unknown_name

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"
_SUFFIXES = (".yaml", ".yml")


def _summary(text: str) -> str:
    """The first sentence of the comment block at the top of a recipe."""
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    words = " ".join(lines)
    end = re.search(r"(?<! al)\.(\s|$)", words)  # "Ma et al. (KDD 2018)" goes on
    return words[: end.start() + 1] if end else words


def _relative_paths(raw: Any) -> list[Path]:
    """The relative ``path`` parameters of ``data.params`` and of each ``data.datasets`` entry."""
    data = raw.get("data") if isinstance(raw, dict) else None
    if not isinstance(data, dict):
        return []
    entries = [data, *(e for e in data.get("datasets") or [] if isinstance(e, dict))]
    found = []
    for entry in entries:
        params = entry.get("params")
        value = params.get("path") if isinstance(params, dict) else None
        if isinstance(value, str) and not Path(value).is_absolute():
            found.append(Path(value))
    return found


@dataclass(frozen=True)
class Recipe:
    """One packaged recipe: its name, YAML file, one-line summary and the data files it reads
    (relative to its folder)."""

    name: str
    path: Path
    summary: str
    data_files: tuple[Path, ...]

    @classmethod
    def read(cls, path: Path) -> Recipe:
        text = path.read_text(encoding="utf-8")
        files = _relative_paths(yaml.safe_load(text))
        return cls(
            path.stem, path, _summary(text), tuple(p for p in files if (path.parent / p).is_file())
        )


def recipe_names() -> list[str]:
    """The names of the packaged recipes, sorted."""
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def recipes() -> list[Recipe]:
    """Every packaged recipe, sorted by name."""
    return [get_recipe(name) for name in recipe_names()]


def get_recipe(name: str) -> Recipe:
    """The packaged recipe ``name``; a ``ConfigError`` listing the recipes if there is none."""
    path = RECIPES_DIR / f"{name}.yaml"
    if "/" in name or "\\" in name or not path.is_file():
        raise ConfigError(unknown_name("recipe", name, recipe_names()))
    return Recipe.read(path)


def resolve(name_or_path: str | Path) -> tuple[Path, Recipe | None]:
    """Where a config comes from: a file that exists wins; else a packaged recipe's name; a
    path-like string (a folder or ``.yaml`` in it) is left to ``load_config`` to report; anything
    else is an unknown recipe (one error listing the recipes)."""
    path = Path(name_or_path)
    text = str(name_or_path)
    if path.exists() or path.suffix in _SUFFIXES or "/" in text or "\\" in text:
        return path, None
    if text in recipe_names():
        recipe = get_recipe(text)
        return recipe.path, recipe
    raise ConfigError(
        f"{unknown_name('recipe', text, recipe_names())} (or give a config file's path)"
    )


def _with_data_at(config: RunConfig, folder: Path) -> RunConfig:
    """``config`` with each relative data ``path`` that exists under ``folder`` made absolute."""

    def moved(params: dict[str, Any]) -> dict[str, Any]:
        value = params.get("path")
        if isinstance(value, str) and not Path(value).is_absolute() and (folder / value).is_file():
            return {**params, "path": str(folder / value)}
        return params

    data = config.data
    update: dict[str, Any] = {"params": moved(data.params)}
    if data.datasets is not None:
        update["datasets"] = [
            e.model_copy(update={"params": moved(e.params)}) for e in data.datasets
        ]
    return config.model_copy(update={"data": data.model_copy(update=update)})


def load_recipe(name_or_path: str | Path, overrides: Sequence[str] = ()) -> RunConfig:
    """``load_config`` for a config file or a packaged recipe's name (``resolve`` decides); a
    packaged recipe reads its own data files."""
    path, recipe = resolve(name_or_path)
    config = load_config(path, overrides)
    return config if recipe is None else _with_data_at(config, recipe.path.parent)


def copy_recipe(name: str, folder: str | Path = ".") -> list[Path]:
    """Copy the packaged recipe ``name`` and its data files into ``folder`` (created if missing),
    keeping their relative paths, so that ``polytask train <name>.yaml`` runs from there. Refuses
    (``ConfigError``, nothing copied) if any of the files exists already. The copied paths."""
    recipe = get_recipe(name)
    folder = Path(folder)
    pairs = [(recipe.path, folder / recipe.path.name)]
    pairs += [(recipe.path.parent / p, folder / p) for p in recipe.data_files]
    existing = [str(target) for _, target in pairs if target.exists()]
    if existing:
        raise ConfigError(f"{', '.join(existing)}: exists already; not overwritten")
    for source, target in pairs:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    return [target for _, target in pairs]
