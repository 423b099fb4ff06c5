"""Registries: everything a YAML file can name (method, architecture, encoder, dataset, ...).

Each entry is a builder (a class or a function) registered with the ``@registry.register(name)``
decorator under a short name, with a one-line description (the first line of its docstring unless
given). ``Registry.get`` fails with the list of known names, and ``Registry.check_params`` names
unknown or missing keyword arguments, and values of the wrong type for the builder's annotation,
before anything is built. The arguments polytask itself
passes to every builder of a registry (the tasks, the input shape...) are declared once, as the
registry's ``provided``; the rest of a builder's signature is what a YAML file may set.

Every registry is listed in one catalogue (``registries()``), from which ``polytask methods`` and
the documentation are built.

Example:
    >>> from polytask.registry import Registry
    >>> shapes = Registry("shape", listed=False)
    >>> @shapes.register("square", "a square of side ``side``")
    ... def square(side: float = 1.0) -> float:
    ...     return side * side
    >>> shapes.get("square")(side=3.0)
    9.0
"""

from __future__ import annotations

import functools
import inspect
import json
import re
import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from pydantic import PydanticUserError, TypeAdapter, ValidationError

from polytask.errors import UnknownNameError, unknown_name

T = TypeVar("T", bound=Callable[..., Any])


@dataclass(frozen=True)
class RegistryEntry:
    """One registered builder with its name and one-line description."""

    name: str
    description: str
    builder: Callable[..., Any]


_CATALOGUE: dict[str, Registry[Any]] = {}


class Registry(Generic[T]):
    """A name → builder map for one kind of component.

    Args:
        kind: what the entries are, as error messages and listings name it ("encoder").
        provided: the arguments polytask passes to every builder itself; they are not YAML
            parameters.
        listed: add the registry to the catalogue of ``registries()`` (False for a private or
            throw-away registry).
    """

    def __init__(self, kind: str, *, provided: tuple[str, ...] = (), listed: bool = True) -> None:
        self.kind = kind
        self.provided = provided
        self._entries: dict[str, RegistryEntry] = {}
        if listed:
            if kind in _CATALOGUE:
                raise ValueError(f"a registry of {kind!r} is listed already")
            _CATALOGUE[kind] = self

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
            raise UnknownNameError(unknown_name(self.kind, name, self._entries)) from None

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[RegistryEntry]:
        return iter(sorted(self._entries.values(), key=lambda e: e.name))

    def names(self) -> list[str]:
        """Sorted registered names."""
        return sorted(self._entries)

    def parameters(self, name: str) -> dict[str, inspect.Parameter]:
        """Keyword parameters the user may set in YAML for ``name``: its signature minus the
        registry's ``provided`` arguments."""
        sig = inspect.signature(self.get(name))
        return {
            p.name: p
            for p in sig.parameters.values()
            if p.name not in self.provided
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
        hints = _type_hints(self.get(name))
        for key, value in params.items():
            if key in allowed and key in hints:
                problem = type_problem(key, value, hints[key])
                if problem:
                    problems.append(f"{problem} ({self.kind} {name!r})")
        return problems


def _type_hints(builder: Callable[..., Any]) -> dict[str, Any]:
    """The resolved annotations of ``builder``'s parameters (a class: of its ``__init__``);
    ``from __future__ import annotations`` strings are evaluated in the builder's module. An
    annotation that cannot be resolved is left out (its values are not checked)."""
    target = builder.__init__ if inspect.isclass(builder) else builder  # type: ignore[misc]
    try:
        return typing.get_type_hints(target)
    except Exception:  # a name only imported under TYPE_CHECKING...: resolve one at a time
        namespace = getattr(inspect.unwrap(target), "__globals__", {})
        hints = {}
        for key, annotation in getattr(target, "__annotations__", {}).items():
            try:
                hints[key] = (
                    eval(annotation, namespace) if isinstance(annotation, str) else annotation
                )
            except Exception:
                continue
        return hints


@functools.lru_cache(maxsize=512)
def _adapter(annotation: Any) -> TypeAdapter[Any] | None:
    """A validator for ``annotation``, or ``None`` for a type pydantic does not know (a tensor,
    a module...): such parameters are not set from YAML."""
    try:
        return TypeAdapter(annotation)
    except (PydanticUserError, TypeError, NameError):
        return None


def type_problem(key: str, value: Any, annotation: Any) -> str | None:
    """Why ``value`` does not fit parameter ``key: annotation``, or ``None`` when it does.

    The value is checked as it comes from YAML or JSON, strictly: ``"3"`` is not an int, ``2.0``
    is not an int, but ``2`` is a float and a list is a tuple. Values JSON cannot hold (a tensor
    passed from Python) are not checked.

    >>> from collections.abc import Sequence
    >>> type_problem("hidden", "abc", Sequence[int])
    "hidden must be Sequence[int], found 'abc'"
    >>> type_problem("hidden", [64, "x"], Sequence[int])
    "hidden must be Sequence[int], found [64, 'x'] (hidden[1]: Input should be a valid integer)"
    >>> type_problem("hidden", [64, 32], tuple[int, ...]) is None
    True
    """
    try:
        adapter = _adapter(annotation)
    except TypeError:  # an unhashable annotation object
        adapter = None
    if adapter is None:
        return None
    try:
        text = json.dumps(value, allow_nan=True)
    except (TypeError, ValueError):
        return None
    try:
        adapter.validate_json(text, strict=True)
    except ValidationError as exc:
        message = f"{key} must be {_type_name(annotation)}, found {value!r}"
        first = exc.errors()[0]
        if first["loc"] and len(exc.errors()) == 1:
            where = key + "".join(f"[{part}]" for part in first["loc"])
            message += f" ({where}: {first['msg']})"
        return message
    return None


def _type_name(annotation: Any) -> str:
    """``Sequence[int]``, ``int | None``, ``Literal['a', 'b']``: an annotation as written."""
    if isinstance(annotation, type) and not typing.get_args(annotation):
        return annotation.__name__
    return re.sub(r"\b(?:collections\.abc|typing)\.", "", str(annotation))


def registries() -> dict[str, Registry[Any]]:
    """Every registry created so far, by kind, in creation order. A registry exists once the
    module defining it is imported (``polytask.balancing``, ``polytask.models``,
    ``polytask.data``...)."""
    return dict(_CATALOGUE)
