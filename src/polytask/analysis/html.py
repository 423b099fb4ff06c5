"""Building blocks of polytask's self-contained HTML pages: sections, tables, notes and
matplotlib figures embedded as base64 PNG. Nothing is fetched when a page opens: no script, no
stylesheet, font or image from elsewhere.

Example:
    >>> page = html_page("run", [section("Test", table(["task", "rmse"], [["t1", 0.5]]))])
    >>> page.startswith("<!DOCTYPE html>") and "<td>0.5000</td>" in page
    True
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

__all__ = [
    "figure_html",
    "format_value",
    "html_page",
    "new_figure",
    "note",
    "png_bytes",
    "png_html",
    "section",
    "slug",
    "table",
]

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto;
       max-width: 1100px; padding: 1.5em; color: #222; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 1.6em; }
h3 { margin-bottom: 0.3em; }
nav a { margin-right: 0.9em; font-size: 0.9em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f3f3f3; }
td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; height: auto; }
.note { color: #666; font-size: 0.9em; }
pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
"""


def slug(text: str) -> str:
    """An HTML id from a title: ``"Test table"`` → ``"test-table"``."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "section"


def format_value(value: Any, digits: int = 4) -> str:
    """A table cell: floats to ``digits`` decimals (``g`` form when very large or small), NaN and
    ``None`` as ``—``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, float):
        extreme = value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3)
        return f"{value:.{digits}g}" if extreme else f"{value:.{digits}f}"
    return str(value)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *, digits: int = 4) -> str:
    """An HTML table; every cell is escaped (floats formatted by ``format_value``)."""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(format_value(c, digits))}</td>" for c in row) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def note(text: str) -> str:
    """A grey explanatory paragraph (escaped)."""
    return f'<p class="note">{html.escape(text)}</p>'


def section(title: str, *parts: str, level: int = 2) -> str:
    """A titled ``<section>`` whose id is the title's ``slug``; ``parts`` are HTML."""
    return (
        f'<section id="{slug(title)}"><h{level}>{html.escape(title)}</h{level}>'
        + "".join(parts)
        + "</section>"
    )


@contextmanager
def new_figure(width: float, height: float) -> Iterator[Any]:
    """A standalone matplotlib ``Figure`` on an Agg canvas (no pyplot, no global backend),
    cleared on exit."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height))
    FigureCanvasAgg(figure)
    try:
        yield figure
    finally:
        figure.clear()


def png_bytes(figure: Any, *, dpi: int = 100) -> bytes:
    """The figure as PNG bytes (laid out tightly)."""
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def png_html(data: bytes, alt: str) -> str:
    """An ``<img>`` holding PNG ``data`` as a base64 ``data:`` URI."""
    encoded = base64.b64encode(data).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{encoded}">'


def figure_html(figure: Any, alt: str, *, dpi: int = 100) -> str:
    """An ``<img>`` holding the matplotlib figure as a base64 PNG."""
    return png_html(png_bytes(figure, dpi=dpi), alt)


def html_page(title: str, sections: Sequence[str], *, subtitle: str = "") -> str:
    """A whole page: the title, links to each section, the sections."""
    ids = re.findall(r'<section id="([^"]+)"><h2>(.*?)</h2>', "".join(sections))
    links = "".join(f'<a href="#{sid}">{name}</a>' for sid, name in ids)
    sub = f'<p class="note">{html.escape(subtitle)}</p>' if subtitle else ""
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>"
        f"<h1>{html.escape(title)}</h1>{sub}<nav>{links}</nav>"
        + "".join(sections)
        + "</body></html>\n"
    )
