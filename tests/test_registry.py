from __future__ import annotations

import pytest

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
