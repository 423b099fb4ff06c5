"""``polytask datasets`` and ``polytask methods``: what can be named in a configuration, listed
from the registries themselves."""

from __future__ import annotations

from rich.table import Table

from polytask.cli.app import command, out
from polytask.registry import Registry, registries


def _all_registries() -> dict[str, Registry]:
    """Every registry, once the packages that define them are imported."""
    import polytask.balancing
    import polytask.data
    import polytask.models  # noqa: F401

    return registries()


@command
def datasets() -> None:
    """List the built-in datasets."""
    table = Table(title="datasets")
    table.add_column("name")
    table.add_column("description")
    for entry in _all_registries()["dataset"]:
        table.add_row(entry.name, entry.description)
    out.print(table)


@command
def methods() -> None:
    """List every registered component: balancing methods, architectures, encoders, heads,
    gates, datasets, samplers, preprocessors."""
    table = Table(title="registered components")
    table.add_column("kind")
    table.add_column("name")
    table.add_column("description")
    for kind, registry in _all_registries().items():
        for entry in registry:
            table.add_row(kind, entry.name, entry.description)
        table.add_section()
    out.print(table)
