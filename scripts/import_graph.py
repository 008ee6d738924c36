"""The product's import graph: which stage imports which, and whether any cycle or private import exists.

Stages are the packages a reader sees in the tree: ``imgsearch`` (shared basics), ``imgsearch.cli``
(the command, which sits on top of everything), ``embed``, ``index.store``, ``index.ann``,
``index.jobs``, ``serve`` and ``train``. Every import counts, at module top or inside a function:
an import that only runs late is still a dependency.

    python scripts/import_graph.py          # prints the stage graph; exit 1 on a cycle or private import
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("imgsearch", "embed", "index", "serve", "train")
# Longest prefix first: a module belongs to the most specific stage that contains it.
STAGES = ("imgsearch.cli", "imgsearch.__main__", "index.store", "index.ann", "index.jobs",
          "imgsearch", "embed", "index", "serve", "train")
COMMAND = {"imgsearch.__main__": "imgsearch.cli"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def stage_of(module: str) -> str | None:
    for stage in STAGES:
        if module == stage or module.startswith(stage + "."):
            return COMMAND.get(stage, stage)
    return None


def product_modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            out[module_name(path)] = path
    return out


def imports_of(path: Path, module: str) -> list[tuple[str, list[str], int]]:
    """(imported module, names imported from it, line) for every import statement in the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.append((base, [alias.name for alias in node.names], node.lineno))
    return found


def resolve(target: str, names: list[str], modules: dict[str, Path]) -> list[str]:
    """The product modules an import statement loads (``from pkg import mod`` names a module)."""
    out = [target] if target in modules else []
    out += [f"{target}.{n}" for n in names if f"{target}.{n}" in modules]
    return out


def analyse() -> tuple[dict[str, set[str]], list[list[str]], list[str], list[list[str]]]:
    """(stage edges, stage cycles, private imports, module cycles)."""
    modules = product_modules()
    stage_edges: dict[str, set[str]] = defaultdict(set)
    module_edges: dict[str, set[str]] = defaultdict(set)
    private = []
    for module, path in modules.items():
        src_stage = stage_of(module)
        for target, names, line in imports_of(path, module):
            loaded = resolve(target, names, modules)
            if not loaded:
                continue
            for mod in loaded:
                module_edges[module].add(mod)
                dst_stage = stage_of(mod)
                if dst_stage and src_stage and dst_stage != src_stage:
                    stage_edges[src_stage].add(dst_stage)
            if target in modules:
                for name in names:
                    if name.startswith("_") and not name.startswith("__") and f"{target}.{name}" not in modules \
                            and target != module:
                        private.append(f"{path.relative_to(REPO)}:{line}: imports {target}.{name}")
    # A package's __init__ importing its own submodules is the package, not a cycle.
    for module in list(module_edges):
        module_edges[module] = {m for m in module_edges[module] if not m.startswith(module + ".")}
    return stage_edges, cycles(stage_edges), private, cycles(module_edges)


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan), each sorted."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in sorted(set(edges) | {w for ws in edges.values() for w in ws}):
        if v not in index:
            visit(v)
    return out


def main() -> int:
    stage_edges, stage_cycles, private, module_cycles = analyse()
    for stage in STAGES:
        if stage in stage_edges:
            print(f"{stage:14s} -> {', '.join(sorted(stage_edges[stage]))}")
    for comp in stage_cycles:
        print(f"stage cycle: {' <-> '.join(comp)}")
    for comp in module_cycles:
        print(f"module cycle: {' <-> '.join(comp)}")
    for line in private:
        print(f"private import: {line}")
    bad = bool(stage_cycles or module_cycles or private)
    print("import graph: " + ("PROBLEMS above" if bad else "no cycles, no private imports"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
