"""Registries: everything a YAML file can name (method, architecture, encoder, dataset, ...).

Each entry is a builder (a class or a function) registered under a short name with a one-line
description. ``Registry.get`` fails with the list of known names, and
``Registry.check_params`` names unknown or missing keyword arguments before anything is built.

Example:
    >>> from polytask.registry import Registry
    >>> shapes = Registry("shape")
    >>> @shapes.register("square", "a square of side ``side``")
    ... def square(side: float = 1.0) -> float:
    ...     return side * side
    >>> shapes.get("square")(side=3.0)
    9.0
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from polytask.errors import UnknownNameError

T = TypeVar("T", bound=Callable[..., Any])


@dataclass(frozen=True)
class RegistryEntry:
    """One registered builder with its name and one-line description."""

    name: str
    description: str
    builder: Callable[..., Any]


class Registry(Generic[T]):
    """A name → builder map for one kind of component (``kind`` is used in error messages)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, RegistryEntry] = {}

    def register(self, name: str, description: str | None = None) -> Callable[[T], T]:
        """Decorator registering ``builder`` under ``name``; the description defaults to the
        first line of its docstring."""

        def decorator(builder: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            lines = (inspect.getdoc(builder) or "").strip().splitlines()
            text = description or (lines[0] if lines else "")
            self._entries[name] = RegistryEntry(name, text, builder)
            return builder

        return decorator

    def get(self, name: str) -> T:
        """The builder registered as ``name``; ``UnknownNameError`` lists the known names."""
        try:
            return self._entries[name].builder  # type: ignore[return-value]
        except KeyError:
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}; known: {', '.join(sorted(self._entries))}"
            ) from None

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[RegistryEntry]:
        return iter(sorted(self._entries.values(), key=lambda e: e.name))

    def names(self) -> list[str]:
        """Sorted registered names."""
        return sorted(self._entries)

    def parameters(self, name: str) -> dict[str, inspect.Parameter]:
        """Keyword parameters the user may set in YAML for ``name`` (its constructor signature,
        minus the arguments polytask itself passes, which start with no default and are listed in
        the builder's ``__provided__``)."""
        builder = self.get(name)
        provided = set(getattr(builder, "__provided__", ()))
        sig = inspect.signature(builder)
        return {
            p.name: p
            for p in sig.parameters.values()
            if p.name not in provided
            and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
            and p.name != "self"
        }

    def check_params(self, name: str, params: Mapping[str, Any]) -> list[str]:
        """Problems with ``params`` for builder ``name`` (unknown keys, missing required ones)."""
        try:
            allowed = self.parameters(name)
        except UnknownNameError as exc:
            return [str(exc)]
        problems = []
        for key in params:
            if key not in allowed:
                valid = ", ".join(sorted(allowed)) or "none"
                problems.append(
                    f"unknown parameter {key!r} for {self.kind} {name!r}; valid: {valid}"
                )
        for key, p in allowed.items():
            if p.default is inspect.Parameter.empty and key not in params:
                problems.append(f"{self.kind} {name!r} needs parameter {key!r}")
        return problems


def describe(registries: Mapping[str, Registry[Any]]) -> Iterator[tuple[str, RegistryEntry]]:
    """(registry kind, entry) for every entry of every registry, for listings."""
    for kind, registry in registries.items():
        for entry in registry:
            yield kind, entry
