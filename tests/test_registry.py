from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Literal

import pytest
import torch

from polytask.balancing import BALANCERS
from polytask.data.sources import DATASETS
from polytask.errors import UnknownNameError
from polytask.models import ARCHITECTURES, ENCODERS, HEADS
from polytask.registry import Registry


def test_unknown_name_lists_known_ones() -> None:
    reg: Registry = Registry("widget", listed=False)
    reg.register("a", "first")(lambda: 1)
    with pytest.raises(UnknownNameError, match="unknown widget 'b'; known: a"):
        reg.get("b")


def test_check_params_reports_unknown_and_missing() -> None:
    reg: Registry = Registry("widget", listed=False)

    @reg.register("w")
    def build(size: int, *, color: str = "red") -> None:
        """A widget."""

    problems = reg.check_params("w", {"colour": "blue"})
    assert "unknown parameter 'colour' for widget 'w'; valid: color, size" in problems
    assert "widget 'w' needs parameter 'size'" in problems
    assert next(iter(reg)).description == "A widget."


def test_duplicate_registration_fails() -> None:
    reg: Registry = Registry("widget", listed=False)
    reg.register("a")(lambda: 1)
    with pytest.raises(ValueError, match="registered twice"):
        reg.register("a")(lambda: 2)


@pytest.mark.parametrize("registry", [BALANCERS, DATASETS, ARCHITECTURES, ENCODERS, HEADS])
def test_every_entry_has_a_description(registry: Registry) -> None:
    for entry in registry:
        assert entry.description, f"{registry.kind} {entry.name} has no description"


def test_check_params_checks_values_against_the_annotations() -> None:
    reg: Registry = Registry("widget", listed=False)

    @reg.register("w")
    def build(
        *, hidden: Sequence[int] = (8,), rate: float = 0.5, mode: Literal["a", "b"] = "a"
    ) -> None:
        """A widget."""

    assert reg.check_params("w", {"hidden": [4, 4], "rate": 1, "mode": "b"}) == []
    problems = reg.check_params("w", {"hidden": "abc", "rate": "fast", "mode": "c"})
    assert problems == [
        "hidden must be Sequence[int], found 'abc' (widget 'w')",
        "rate must be float, found 'fast' (widget 'w')",
        "mode must be Literal['a', 'b'], found 'c' (widget 'w')",
    ]
    assert reg.check_params("w", {"hidden": [16, 8.5]}) == [
        "hidden must be Sequence[int], found [16, 8.5] (hidden[1]: Input should be a valid "
        "integer) (widget 'w')"
    ]
    # values YAML cannot hold (passed from Python) are left to the builder
    assert reg.check_params("w", {"hidden": torch.tensor([4])}) == []


def test_annotations_that_cannot_be_resolved_are_not_checked() -> None:
    reg: Registry = Registry("widget", listed=False)

    @reg.register("w")
    def build(*, size: int = 1, model: NotImportedAtRunTime = None) -> None:  # type: ignore[assignment]  # noqa: F821
        """A widget whose annotation names a type imported only for type checkers."""

    assert reg.check_params("w", {"size": "big", "model": "anything"}) == [
        "size must be int, found 'big' (widget 'w')"
    ]


@pytest.mark.parametrize("registry", [BALANCERS, DATASETS, ARCHITECTURES, ENCODERS, HEADS])
def test_every_default_value_passes_its_own_type_check(registry: Registry) -> None:
    """The checks are never stricter than the builders' own defaults."""
    for entry in registry:
        defaults = {
            key: p.default
            for key, p in registry.parameters(entry.name).items()
            if p.default is not inspect.Parameter.empty and p.default is not None
        }
        problems = [p for p in registry.check_params(entry.name, defaults) if "must be" in p]
        assert problems == [], (registry.kind, entry.name)
