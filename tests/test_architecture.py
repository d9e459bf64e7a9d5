"""The package's layers (docs/architecture.md): no import circle, no import from a lower layer up.

Every ``import`` of genrecls in the package is read with ``ast``, at module level and inside
functions alike (a lazy import is still a dependency), ``TYPE_CHECKING`` blocks included.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "genrecls"

#: layer of each top-level part of the package: a module may import its own layer or lower;
#: two parts of one layer (audio, storage) never import each other
LAYERS = {"core": 0, "audio": 1, "storage": 1, "models": 2, "jobs": 3, "": 4}


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def genrecls_imports(path: pathlib.Path, name: str) -> set[str]:
    """The genrecls modules ``path`` imports (``from genrecls.x import y`` gives ``genrecls.x.y`` when that is a module)."""
    is_pkg = path.name == "__init__.py"
    here = name.split(".") if is_pkg else name.split(".")[:-1]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "genrecls")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(here[: len(here) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base.split(".")[0] != "genrecls":
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.add(sub if sub in MODULES else base)
    return {m for m in out if m != name}


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}
GRAPH = {name: genrecls_imports(path, name) for name, path in MODULES.items()}


def part(module: str) -> str:
    """``core``, ``audio``... for ``genrecls.core.config``; ``""`` for the top (the package, its CLI, ``__main__``)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in LAYERS) else ""


def test_every_module_belongs_to_a_layer():
    assert {part(m) for m in MODULES} <= set(LAYERS), sorted({part(m) for m in MODULES} - set(LAYERS))


def test_no_import_goes_up_or_sideways():
    bad = []
    for src, targets in GRAPH.items():
        for dst in targets:
            if dst == "genrecls":  # the package's version string
                continue
            a, b = part(src), part(dst)
            if a != b and (LAYERS[b] > LAYERS[a] or LAYERS[b] == LAYERS[a]):
                bad.append(f"{src} -> {dst}")
    assert not bad, "imports against the layers (docs/architecture.md):\n" + "\n".join(sorted(bad))


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), i.e. the import circles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_circles():
    # a package's __init__ re-exports its modules, and its modules never import it back
    modules_only = {m: {t for t in ts if not (MODULES[t].name == "__init__.py" and m.startswith(t + "."))}
                    for m, ts in GRAPH.items()}
    assert cycles(modules_only) == []


def test_the_circle_finder_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_modules_import_siblings_by_module_never_through_their_package():
    bad = [f"{m} -> {t}" for m, ts in GRAPH.items() for t in ts
           if MODULES[t].name == "__init__.py" and m.startswith(t + ".") and t != "genrecls"]
    assert not bad, bad


@pytest.mark.parametrize("folder", ["bench", "jobs"])
def test_scripts_use_only_the_public_surface(folder):
    """bench/ and jobs/ import genrecls only through the packages' ``__init__`` exports."""
    public = {}
    for name, path in MODULES.items():
        if path.name == "__init__.py":
            tree = ast.parse(path.read_text())
            exported = {e.value for n in tree.body if isinstance(n, ast.Assign)
                        and any(getattr(t, "id", "") == "__all__" for t in n.targets) for e in n.value.elts}
            public[name] = exported | ({"__version__"} if name == "genrecls" else set())
    public["genrecls.cli"] = {"main", "run_job"}  # the command line: what jobs/ entry points call
    bad = []
    for path in sorted((ROOT / folder).glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "genrecls":
                if node.module not in public:
                    bad.append(f"{path.name}: from {node.module} import ... (not a package)")
                    continue
                bad += [f"{path.name}: {node.module}.{a.name}" for a in node.names
                        if a.name not in public[node.module] and f"{node.module}.{a.name}" not in public]
            elif isinstance(node, ast.Import):
                bad += [f"{path.name}: import {a.name}" for a in node.names
                        if a.name.split(".")[0] == "genrecls" and a.name not in public]
    assert not bad, "\n".join(bad)
