"""MkDocs hooks of the polytask documentation site (``hooks:`` in ``mkdocs.yml``).

- The command-line reference: ``<!-- polytask-cli -->`` in a page becomes the Markdown of the
  typer app's Click command tree (``typer.main.get_command(polytask.cli.app)``): every command's
  usage, help text, arguments and options, read from the code at build time.
- The ``Tutorials`` section of the nav lists the Markdown notebooks present in
  ``docs/tutorials/`` (``01-...md``, ``02-...md``, ...) when the site is built, so the build
  passes whether or not they exist yet.
- ``benchmarks/results/*.md`` (written by the scripts of ``benchmarks/``) are published as pages
  under ``benchmarks/results/`` and listed under ``Benchmarks`` → ``Raw results``; the links to
  them from ``docs/*.md`` (``../benchmarks/results/x.md``, right when read on GitHub) are
  rewritten to those pages.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
CLI_MARKER = "<!-- polytask-cli -->"


# -- the command-line reference ---------------------------------------------------------------


# typer ships its own copy of Click (``typer._click``, whose classes are not ``click``'s), so the
# tree is read by duck typing: groups have ``list_commands``, parameters a ``param_type_name``.
Command = Any
Context = Any
Parameter = Any


def _is_option(param: Parameter) -> bool:
    return getattr(param, "param_type_name", "") == "option"


def _type_name(param: Parameter, ctx: Context) -> str:
    shown = param.display_type(ctx) if hasattr(param, "display_type") else ""
    if not shown:
        shown = getattr(getattr(param, "type", None), "name", "")
    return f"`{shown.strip('<>')}`" if shown else ""


def _default(param: Parameter) -> str:
    if param.required or param.default is None or param.default == ():
        return ""
    if _is_option(param) and param.is_flag and not param.secondary_opts:
        return "" if param.default is False else "on"
    default = param.default
    if _is_option(param) and param.secondary_opts and isinstance(default, bool):
        return f"`{param.opts[0] if default else param.secondary_opts[0]}`"
    if isinstance(default, list | tuple):
        default = ",".join(map(str, default))
    return f"`{default}`"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _params_table(params: list[Parameter], ctx: Context, arguments: bool) -> list[str]:
    if not params:
        return []
    head = "argument" if arguments else "option"
    lines = [f"| {head} | type | default | description |", "|---|---|---|---|"]
    for param in params:
        if arguments:
            name = f"`{(param.name or '').upper()}`"
            if param.nargs == -1:
                name += " ..."
        else:
            names = [*param.opts, *param.secondary_opts]
            name = " / ".join(f"`{opt}`" for opt in names)
        required = " (required)" if param.required else ""
        help_text = getattr(param, "help", None) or ""
        kind, default = _type_name(param, ctx), _default(param)
        lines.append(f"| {name}{required} | {kind} | {default} | {_cell(help_text)} |")
    return lines


def _help_paragraphs(text: str) -> str:
    """Click's help: paragraphs separated by blank lines, hard-wrapped inside."""
    text = text.split("\f", 1)[0]
    return "\n\n".join(" ".join(p.split()) for p in re.split(r"\n\s*\n", text.strip()) if p)


def _command_markdown(command: Command, ctx: Context, level: int) -> list[str]:
    lines: list[str] = []
    usage = " ".join(command.collect_usage_pieces(ctx))
    lines += [f"{'#' * level} `{ctx.command_path}`", ""]
    if command.help:
        lines += [_help_paragraphs(command.help), ""]
    lines += ["```text", f"{ctx.command_path} {usage}".rstrip(), "```", ""]
    visible = [
        p
        for p in command.get_params(ctx)
        if not getattr(p, "hidden", False) and p.name != "help"  # --help: on every command
    ]
    arguments = [p for p in visible if p.param_type_name == "argument"]
    options = [p for p in visible if _is_option(p)]
    for table in (_params_table(arguments, ctx, True), _params_table(options, ctx, False)):
        if table:
            lines += [*table, ""]
    if hasattr(command, "list_commands"):
        for name in command.list_commands(ctx):
            sub = command.get_command(ctx, name)
            if sub is None or sub.hidden:
                continue
            sub_ctx = sub.context_class(sub, info_name=name, parent=ctx)
            lines += _command_markdown(sub, sub_ctx, level + 1)
    return lines


def cli_reference() -> str:
    """The Markdown reference of every ``polytask`` command, from the typer app."""
    import typer.main

    from polytask.cli import app

    group = typer.main.get_command(app)
    ctx = group.context_class(group, info_name="polytask")
    lines = _command_markdown(group, ctx, 2)
    if hasattr(group, "list_commands"):
        names = [n for n in group.list_commands(ctx) if not group.get_command(ctx, n).hidden]
        index = ", ".join(f"[`{n}`](#polytask-{n})" for n in names)
        lines[2:2] = [f"Commands: {index}.", ""]
    return "\n".join(lines)


# -- mkdocs events ----------------------------------------------------------------------------


def _find_section(nav: list[Any], title: str) -> list[Any] | None:
    for entry in nav:
        if isinstance(entry, dict):
            for key, value in entry.items():
                if key == title and isinstance(value, list):
                    return value
                if isinstance(value, list):
                    found = _find_section(value, title)
                    if found is not None:
                        return found
    return None


def _title(path: Path) -> str:
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("# "):
            return line[2:].strip().strip("`")
    return path.stem


def on_config(config: Any) -> Any:
    docs = Path(config["docs_dir"])
    tutorials = _find_section(config["nav"], "Tutorials")
    if tutorials is not None:
        for path in sorted((docs / "tutorials").glob("*.md")):
            if path.name != "index.md":
                tutorials.append({_title(path): f"tutorials/{path.name}"})
    benchmarks = _find_section(config["nav"], "Benchmarks")
    if benchmarks is not None and RESULTS.is_dir():
        raw = [
            {_title(path): f"benchmarks/results/{path.name}"}
            for path in sorted(RESULTS.glob("*.md"))
        ]
        if raw:
            benchmarks.append({"Raw results": raw})
    return config


def on_files(files: Any, config: Any) -> Any:
    from mkdocs.structure.files import File

    if RESULTS.is_dir():
        for path in sorted(RESULTS.glob("*.md")):
            files.append(
                File.generated(
                    config,
                    f"benchmarks/results/{path.name}",
                    content=path.read_text(encoding="utf-8"),
                )
            )
    return files


_RESULTS_LINK = re.compile(r"\]\(((?:\.\./)+)benchmarks/results/")


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    # a link from docs/<dir>/page.md to the repository's benchmarks/results/ climbs one level
    # more than its depth in docs/; on the site those files live in docs' benchmarks/results/
    depth = page.file.src_uri.count("/")

    def rewrite(match: re.Match[str]) -> str:
        ups = match.group(1).count("../")
        if ups != depth + 1:
            return match.group(0)
        return "](" + "../" * depth + "benchmarks/results/"

    markdown = _RESULTS_LINK.sub(rewrite, markdown)
    if CLI_MARKER in markdown:
        markdown = markdown.replace(CLI_MARKER, cli_reference())
    return markdown
