#!/usr/bin/env python3
"""Measure the house: the node's lines, the longest functions, the import cycles (module and
package level, imports inside functions included), the size of each room.

    python scripts/house_metrics.py [--json out.json]

Static (AST only, imports nothing from the package), so it runs on any checkout.
"""
from __future__ import annotations

import argparse
import ast
import json
import pathlib
import sys
from typing import Dict, List, Set, Tuple

ROOT = pathlib.Path(__file__).resolve().parents[1]
PKG = "runa_ood_node"


def modules(root: pathlib.Path = ROOT) -> Dict[str, pathlib.Path]:
    out = {}
    for path in sorted((root / PKG).rglob("*.py")):
        rel = path.relative_to(root).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _resolve(name: str, mods: Dict[str, pathlib.Path]) -> str:
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name


def imports_of(mod: str, path: pathlib.Path, mods: Dict[str, pathlib.Path]) -> Set[str]:
    """Every module of the package that ``mod`` imports, at any level (functions included)."""
    tree = ast.parse(path.read_text(), str(path))
    pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out: Set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == PKG:
                    out.add(_resolve(a.name, mods))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            if base.split(".")[0] != PKG:
                continue
            for a in node.names:
                full = f"{base}.{a.name}"
                out.add(full if full in mods else _resolve(base, mods))
    out.discard(mod)
    out.discard("")
    return out


def import_graph(root: pathlib.Path = ROOT) -> Dict[str, Set[str]]:
    mods = modules(root)
    return {m: imports_of(m, p, mods) for m, p in mods.items()}


def package_graph(graph: Dict[str, Set[str]]) -> Dict[str, Set[str]]:
    """Rooms: the top-level part a module lives in (``core`` with its ``core.methods``,
    ``backends``, ``factory``, ``ros``, ``tools``, ``proving_ground``)."""
    def room(m: str) -> str:
        return ".".join(m.split(".")[:2])

    rooms: Dict[str, Set[str]] = {}
    for m, deps in graph.items():
        if m == PKG:
            continue
        r = room(m)
        rooms.setdefault(r, set())
        rooms[r].update(room(d) for d in deps if room(d) not in (r, PKG))
    return rooms


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components with more than one member (Tarjan, iterative)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on: Set[str] = set()
    out: List[List[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        work = [(v, iter(sorted(graph.get(v, ()))))]
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        while work:
            node, it = work[-1]
            for w in it:
                if w not in graph:
                    continue
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                    break
                if w in on:
                    low[node] = min(low[node], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        comp.append(w)
                        if w == node:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def functions(paths) -> List[Tuple[int, str]]:
    out = []
    for path in paths:
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                out.append((n, f"{path.relative_to(ROOT)}:{node.lineno} {node.name}"))
    return sorted(out, reverse=True)


def function_imports(root: pathlib.Path = ROOT) -> int:
    n = 0
    for path in (root / PKG).rglob("*.py"):
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n += sum(isinstance(x, (ast.Import, ast.ImportFrom)) for x in ast.walk(fn))
    return n


def measure() -> dict:
    graph = import_graph()
    mods = modules()
    node = ROOT / PKG / "ros" / "node.py"
    core_ros = [p for m, p in mods.items() if m.startswith(f"{PKG}.core") or m.startswith(f"{PKG}.ros")]
    rooms: Dict[str, int] = {}
    for m, p in mods.items():
        r = m.split(".")[1] if "." in m else m
        rooms[r] = rooms.get(r, 0) + len(p.read_text().splitlines())
    longest = functions(core_ros)
    return {
        "node_lines": len(node.read_text().splitlines()),
        "longest_functions_core_ros": [f"{n} {name}" for n, name in longest[:8]],
        "functions_over_80_core_ros": sum(n > 80 for n, _ in longest),
        "module_cycles": cycles(graph),
        "package_cycles": cycles(package_graph(graph)),
        "imports_inside_functions": function_imports(),
        "lines_by_room": rooms,
        "lines_total": sum(rooms.values()),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args(argv)
    m = measure()
    for k, v in m.items():
        if isinstance(v, list) and v and isinstance(v[0], (str, list)):
            print(f"{k}: {len(v)}")
            for x in v:
                print(f"    {x}")
        else:
            print(f"{k}: {v}")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(m, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
