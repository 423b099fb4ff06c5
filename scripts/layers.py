#!/usr/bin/env python3
"""Print polytask's import graph by layer, from the source's AST (nothing is imported), and check
the two rules of docs/architecture.md:

1. **One way.** A module imports only from layers below its own. Packages that share a layer
   (``models``, ``balancing`` and ``data``; ``serve`` and ``analysis``) do not import each other.
   Every import counts, including those inside functions and under ``TYPE_CHECKING``.
2. **No cycle** among module-level imports, counting package ``__init__`` files: importing
   ``polytask.a.b`` runs ``polytask/a/__init__.py`` first, so an edge to ``polytask.a.b`` is also
   an edge to ``polytask.a`` unless that package encloses the importing module.

It also lists the longest functions (rule: none over ``--max-lines`` lines).

Usage::

    python scripts/layers.py            # the graph, the longest ten functions, violations
    python scripts/layers.py --check    # exit 1 on any violation (run by the tests)
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "polytask"

#: top to bottom; names on one line share a layer and may not import each other
LAYERS: list[tuple[str, ...]] = [
    ("__main__",),
    ("cli",),
    ("tune",),  # tune's study report uses analysis' HTML blocks
    ("serve", "analysis"),
    ("run",),
    ("privacy",),  # DP-SGD: PrivateTrainer subclasses train's Trainer; run builds it
    ("train",),
    ("runtime",),
    ("evaluate",),
    ("config",),
    ("models", "balancing", "data"),
    ("__init__",),  # the package's own __init__: its version and re-exports of the layers below
    ("tasks", "pretrained"),  # pretrained: where packaged pretrained models are (data and models)
    ("dense_tasks",),  # the dense (per-pixel) task kinds tasks.TaskSpec delegates to
    ("registry",),
    ("io", "errors"),
]


@dataclass
class Module:
    """One source file: its dotted name, its imports and its functions' lengths."""

    name: str
    path: Path
    is_package: bool
    imports: list[tuple[str, int, bool]] = field(default_factory=list)  # (target, line, eager)
    functions: list[tuple[int, str, int]] = field(default_factory=list)  # (lines, name, line)


def module_name(path: Path, root: Path = ROOT) -> tuple[str, bool]:
    parts = list(path.relative_to(root).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    if is_package:
        parts = parts[:-1]
    return ".".join(parts), is_package


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _resolve(module: Module, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.name.split(".")
    if not module.is_package:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def parse(path: Path, known: set[str], root: Path = ROOT) -> Module:
    name, is_package = module_name(path, root)
    module = Module(name, path, is_package)
    tree = ast.parse(path.read_text(), filename=str(path))

    def visit(node: ast.AST, eager: bool, qualname: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name.split(".")[0] == PACKAGE:
                        module.imports.append((alias.name, child.lineno, eager))
            elif isinstance(child, ast.ImportFrom):
                target = _resolve(module, child)
                if target.split(".")[0] != PACKAGE:
                    continue
                for alias in child.names:
                    sub = f"{target}.{alias.name}"
                    module.imports.append((sub if sub in known else target, child.lineno, eager))
            elif isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                inner = f"{qualname}.{child.name}" if qualname else child.name
                length = (child.end_lineno or child.lineno) - child.lineno + 1
                module.functions.append((length, inner, child.lineno))
                visit(child, False, inner)
            elif isinstance(child, ast.ClassDef):
                visit(child, eager, f"{qualname}.{child.name}" if qualname else child.name)
            elif isinstance(child, ast.If) and _is_type_checking(child):
                visit(child, False, qualname)
            else:
                visit(child, eager, qualname)

    visit(tree, True, "")
    module.imports = list(dict.fromkeys(module.imports))
    return module


def load(root: Path = ROOT) -> dict[str, Module]:
    paths = sorted((root / PACKAGE).rglob("*.py"))
    known = {module_name(p, root)[0] for p in paths}
    return {m.name: m for m in (parse(p, known, root) for p in paths)}


def _where(module: Module) -> str:
    parts = module.path.parts
    return "/".join(parts[parts.index(PACKAGE) - 1 :]) if PACKAGE in parts else str(module.path)


def layer_of(name: str) -> tuple[int, str]:
    """(rank from the bottom, top-level part) of a dotted module name."""
    parts = name.split(".")
    top = parts[1] if len(parts) > 1 else "__init__"
    for rank, names in enumerate(reversed(LAYERS)):
        if top in names:
            return rank, top
    return -1, top  # reported by ``unplaced``


def unplaced(modules: dict[str, Module]) -> list[str]:
    return sorted(
        f"{_where(m)}: {layer_of(m.name)[1]!r} is in no layer of LAYERS"
        for m in modules.values()
        if layer_of(m.name)[0] < 0
    )


def upward_imports(modules: dict[str, Module]) -> list[str]:
    problems = []
    for module in modules.values():
        rank, top = layer_of(module.name)
        for target, line, _ in module.imports:
            t_rank, t_top = layer_of(target)
            if t_top == top or t_rank < rank or rank < 0:
                continue
            kind = "a peer" if t_rank == rank else "an upper layer"
            problems.append(
                f"{_where(module)}:{line}: {module.name} imports "
                f"{target} ({kind}: {top} -> {t_top})"
            )
    return problems


def eager_graph(modules: dict[str, Module]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = defaultdict(set)
    for module in modules.values():
        own = module.name.split(".")
        enclosing = {
            ".".join(own[:i]) for i in range(1, len(own) + (1 if module.is_package else 0))
        }
        for target, _, eager in module.imports:
            if not eager:
                continue
            if target != module.name:
                graph[module.name].add(target)
            parts = target.split(".")
            for i in range(2, len(parts)):
                parent = ".".join(parts[:i])
                if parent not in enclosing and parent in modules:
                    graph[module.name].add(parent)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]
    sys.setrecursionlimit(10_000)

    def connect(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def layer_graph(modules: dict[str, Module]) -> dict[str, set[str]]:
    edges: dict[str, set[str]] = defaultdict(set)
    for module in modules.values():
        _, top = layer_of(module.name)
        for target, _, _ in module.imports:
            _, t_top = layer_of(target)
            if t_top != top:
                edges[top].add(t_top)
    return edges


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 on any violation")
    parser.add_argument("--max-lines", type=int, default=80, help="longest function allowed")
    parser.add_argument("--top", type=int, default=10, help="longest functions to print")
    parser.add_argument("--root", type=Path, default=ROOT, help="the folder holding polytask/")
    args = parser.parse_args(argv)
    modules = load(args.root)

    print("layers (top to bottom) and what each imports:")
    edges = layer_graph(modules)
    for names in LAYERS:
        for top in names:
            below = sorted(edges.get(top, ()), key=lambda t: -layer_of(f"{PACKAGE}.{t}")[0])
            print(f"  {top:<10} -> {', '.join(below) or '-'}")

    functions = sorted(
        (
            (length, f"{_where(m)}:{line} {qual}")
            for m in modules.values()
            for length, qual, line in m.functions
        ),
        reverse=True,
    )
    print(f"\nlongest {args.top} functions (limit {args.max_lines} lines):")
    for length, where in functions[: args.top]:
        print(f"  {length:4d}  {where}")

    problems = unplaced(modules) + upward_imports(modules)
    problems += [f"import cycle: {' <-> '.join(c)}" for c in cycles(eager_graph(modules))]
    problems += [
        f"{where}: {length} lines (limit {args.max_lines})"
        for length, where in functions
        if length > args.max_lines
    ]
    print(f"\n{len(modules)} modules; {len(problems)} violation(s)")
    for problem in problems:
        print(f"  {problem}")
    return 1 if problems and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
