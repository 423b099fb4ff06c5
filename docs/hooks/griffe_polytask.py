"""A Griffe extension (mkdocstrings' Python handler, ``extensions:`` in ``mkdocs.yml``).

polytask's docstrings head their doctests ``Example:``; Google style knows ``Examples:``, and
renders any other title as an admonition of Markdown, where ``>>>`` lines are block quotes. This
reads ``Example:`` as ``Examples:`` so the doctests render as Python sessions; the source is
unchanged.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_EXAMPLE = re.compile(r"^(\s*)Example:[ \t]*$", re.MULTILINE)


class ExampleSections(griffe.Extension):
    """Rename ``Example:`` sections to ``Examples:`` in every loaded docstring."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _EXAMPLE.sub(r"\1Examples:", obj.docstring.value)
