"""The package's import graph: no cycle, at most six levels, nothing imports upward.

Read statically from the source (``ast``), imports inside functions included, since a
cycle hidden in a function is still a cycle. A *unit* is a top-level module or package
of ``privimage``; ``config`` and ``io`` are toolboxes of independent parts, so each of
their modules is a unit of its own (``config.schema`` sits at the bottom, ``config.store``
near the top). A unit's level is the length of its longest chain of imports down to a
unit that imports nothing of ours. ``LAYERS`` is the intended order
(``docs/architecture.md``): a unit may import only units of its own layer or below.

    python tests/test_import_graph.py   # prints each unit's level, layer and imports
"""

from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "privimage"
SPLIT = ("config", "io")  # packages whose modules are units of their own
MAX_LEVELS = 6
# Packages whose __init__ is only a docstring (docs/architecture.md lists their modules;
# ``data`` is one row for the whole package).
UNLISTED = {"config", "io", "dp", "nets", "query", "metrics"}
# errors/schema -> cores -> data, metrics, artifacts -> stages -> pipeline -> CLI, reporting
LAYERS = {
    "errors": 1,
    "config.schema": 1,
    "io.atomic": 1,
    "io.seeding": 1,
    "io.names": 1,
    "io.trackers": 1,
    "io.cards": 2,
    "plots": 1,
    "io.stats": 2,
    "io.artifacts": 2,
    "query": 2,
    "dp": 2,
    "diffusion": 2,
    "schedule": 1,
    "nets": 2,
    "clip_query": 2,
    "selection_score": 2,
    "bnstat": 2,
    "report": 2,
    "data": 3,
    "metrics": 3,
    "io.release": 3,
    "runtime": 3,
    "config.validate": 3,
    "stages": 4,
    "config.store": 4,
    "reuse": 4,
    "pipeline": 5,
    "__main__": 6,
    "results": 6,
    "push": 6,
    "config": 1,  # the packages' __init__: docstrings
    "io": 1,
    "": 6,  # privimage/__init__.py: the public API
}


def modules() -> dict[str, Path]:
    """Dotted name (without ``privimage.``) of every module, to its file."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The privimage modules ``name`` imports, anywhere in its file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]

    def resolve(dotted: str) -> str | None:
        while dotted not in known and "." in dotted:
            dotted = dotted.rpartition(".")[0]
        return dotted if dotted in known else None

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's own package upwards
                base = package.split(".") if package else []
                base = base[: len(base) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
                module = f"privimage.{module}" if module else "privimage"
            else:
                module = node.module or ""
            # ``from pkg import submodule`` imports the submodule; any other name comes
            # from ``pkg`` itself.
            short = module.removeprefix("privimage").removeprefix(".")
            targets = [
                f"{module}.{a.name}" if f"{short}.{a.name}".strip(".") in known else module
                for a in node.names
            ]
        else:
            continue
        for target in targets:
            if target == "privimage" or target.startswith("privimage."):
                hit = resolve(target.removeprefix("privimage").removeprefix("."))
                if hit is not None and hit != name:
                    found.add(hit)
    return found


def unit(module: str) -> str:
    parts = module.split(".")
    if parts[0] in SPLIT and len(parts) > 1:
        return ".".join(parts[:2])
    return parts[0]


def graphs() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """The module graph and the unit graph (edges inside a unit dropped)."""
    known = modules()
    by_module = {name: imports_of(name, path, known) for name, path in known.items()}
    by_unit: dict[str, set[str]] = {}
    for name, targets in by_module.items():
        here = unit(name)
        by_unit.setdefault(here, set()).update(unit(t) for t in targets if unit(t) != here)
    return by_module, by_unit


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def levels(graph: dict[str, set[str]]) -> dict[str, int]:
    """Longest import chain from each node down (1: imports nothing of ours); acyclic."""

    @functools.cache
    def level(node: str) -> int:
        return 1 + max((level(n) for n in graph.get(node, ())), default=0)

    return {node: level(node) for node in graph}


def test_no_module_imports_itself_round_a_cycle():
    by_module, by_unit = graphs()
    assert cycles(by_module) == []
    assert cycles(by_unit) == []


def test_every_unit_has_a_layer_and_imports_nothing_above_it():
    _, by_unit = graphs()
    assert set(by_unit) <= set(LAYERS), f"give {set(by_unit) - set(LAYERS)} a layer"
    upward = [
        f"{u} (layer {LAYERS[u]}) imports {t} (layer {LAYERS[t]})"
        for u, targets in sorted(by_unit.items())
        for t in sorted(targets)
        if LAYERS[t] > LAYERS[u]
    ]
    assert upward == []


def test_at_most_six_levels():
    _, by_unit = graphs()
    deepest = max(levels(by_unit).values())
    assert deepest <= MAX_LEVELS


def test_no_stage_imports_another_stage():
    """Stages talk through files (privimage.io.artifacts); only the package's own
    ``__init__`` (the stage list) names them all."""
    by_module, _ = graphs()
    crossing = [
        f"{m} imports {t}"
        for m, targets in sorted(by_module.items())
        if m.startswith("stages.")
        for t in sorted(targets)
        if t.startswith("stages.") or t == "stages"
    ]
    assert crossing == []


def test_the_architecture_page_lists_every_module():
    """docs/architecture.md has one row per module, and no row for a module that is gone."""
    page = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    table = page[page.index("## Modules") : page.index("## The stage file contract")]
    listed = {"" if m == "privimage" else m for m in re.findall(r"^\| `([\w.]+)`", table, re.M)}
    wanted = {m for m in modules() if m not in UNLISTED and not m.startswith("data.")}
    assert sorted(wanted - listed) == [], "add these to docs/architecture.md"
    assert sorted(listed - set(modules())) == [], "docs/architecture.md lists modules that are gone"


FILE_NAME = re.compile(r"^[\w.-]+\.(npy|npz|json|jsonl|png|md|pt|csv|yaml|safetensors)$")


def test_each_file_name_is_spelled_once():
    """A file a stage writes is named by one constant, not by literals in several places."""
    seen: dict[str, list[str]] = {}
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            is_text = isinstance(node, ast.Constant) and isinstance(node.value, str)
            if is_text and FILE_NAME.match(node.value):
                seen.setdefault(node.value, []).append(f"{name}:{node.lineno}")
    assert len(seen) > 10  # the scan finds the names (metrics.json, samples.npz, ...)
    assert {k: v for k, v in seen.items() if len(v) > 1} == {}


def test_the_checks_catch_what_they_look_for():
    """A cycle, and the level count, on toy graphs: the checks above can fail."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    assert levels({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == {"a": 3, "b": 2, "c": 1}


def test_the_graph_is_read_from_the_source():
    """The reader sees real edges (a graph of nothing would pass every test above)."""
    by_module, by_unit = graphs()
    assert {"io.artifacts", "dp.accounting"} <= by_module["dp.ledger"]
    assert "stages" in by_unit["pipeline"] and "pipeline" in by_unit["__main__"]
    assert max(levels(by_unit).values()) >= 5


def main() -> None:
    _, by_unit = graphs()
    found = cycles(by_unit)
    if found:
        raise SystemExit(f"import cycles: {found}")
    level = levels(by_unit)
    for u in sorted(by_unit, key=lambda u: (level[u], u)):
        print(f"level {level[u]}  layer {LAYERS.get(u, '?')}  {u or 'privimage'}: ", end="")
        print(", ".join(sorted(by_unit[u])) or "-")


if __name__ == "__main__":
    main()
