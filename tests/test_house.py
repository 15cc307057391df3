"""The house rules of docs/ARCHITECTURE.md, checked over the source: no import circle (lazy
imports inside functions count too: they hide a circle, they do not remove it), no module
over 500 lines, no function over 80, and each room imports only what its docstring allows."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"pipeline": "dynavit.pipeline", "trainer": "dynavit.trainer", "manifests": "dynavit.manifests"}


def modules(root: Path = ROOT) -> dict[str, Path]:
    out = {}
    for folder, package in PACKAGES.items():
        for path in sorted((root / folder).rglob("*.py")):
            parts = list(path.relative_to(root / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([package, *parts])] = path
    return out


def _type_checking_nodes(tree) -> set[int]:
    """Imports under `if TYPE_CHECKING:` exist for annotations only."""
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            skip.update(id(n) for n in ast.walk(node))
    return skip


def imports(name: str, path: Path, known: dict) -> set[str]:
    """The dynavit modules `name` imports, at module level or inside functions."""
    tree = ast.parse(path.read_text())
    skip, found = _type_checking_nodes(tree), set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                parent = parent[:len(parent) - (node.level - 1)]
                base = ".".join(parent + ([node.module] if node.module else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if full in known else base)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                found.update(".".join(parts[:i]) for i in range(len(parts), 0, -1) if ".".join(parts[:i]) in known)
    return {m for m in found if m in known and m != name}


def unknown_imports(root: Path = ROOT) -> list[str]:
    """`from dynavit.x.y import z` where neither dynavit.x.y.z nor dynavit.x.y is a module: a
    path left behind by a move, which a lazy import would only reveal when it runs."""
    known, found = modules(root), []
    scripts = sorted((root / "tests").glob("*.py")) + sorted((root / "docs").glob("*.py"))
    for path in [*known.values(), *scripts]:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").startswith("dynavit."):
                if node.module not in known and not any(f"{node.module}.{a.name}" in known for a in node.names):
                    found.append(f"{path.relative_to(root)}:{node.lineno} from {node.module} import ...")
            elif isinstance(node, ast.Import):
                found += [f"{path.relative_to(root)}:{node.lineno} import {a.name}" for a in node.names
                          if a.name.startswith("dynavit.") and a.name not in known]
    return found


def graph(root: Path = ROOT) -> dict[str, set[str]]:
    known = modules(root)
    return {name: imports(name, path, known) for name, path in known.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g[v]:
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
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def room(module: str) -> str:
    parts = module.split(".")
    if parts[1] == "trainer" and len(parts) > 3 or parts[1] == "trainer" and len(parts) == 3 and \
            parts[2] in ("methods", "infer", "analysis", "bench"):
        return f"trainer.{parts[2]}"
    if parts[1] == "pipeline" and len(parts) > 2 and parts[2] == "bench":
        return "pipeline.bench"
    if module in ("dynavit.trainer.cli", "dynavit.trainer.cli_tools", "dynavit.pipeline.cli"):
        return "cli"
    return parts[1] if parts[1] != "trainer" else "trainer.core"


# room -> rooms it may not import (docs/ARCHITECTURE.md and each package's docstring)
FORBIDDEN = {
    "manifests": {"pipeline", "trainer.core", "trainer.methods", "trainer.infer", "trainer.analysis", "trainer.bench",
                  "pipeline.bench", "cli"},
    "pipeline": {"trainer.core", "trainer.methods", "trainer.infer", "trainer.analysis", "trainer.bench",
                 "pipeline.bench", "cli"},
    "trainer.methods": {"pipeline", "trainer.core", "trainer.infer", "trainer.analysis", "trainer.bench",
                        "pipeline.bench", "cli"},
    "trainer.core": {"trainer.infer", "trainer.analysis", "trainer.bench", "pipeline.bench", "cli"},
    "trainer.infer": {"trainer.analysis", "trainer.bench", "pipeline.bench", "cli"},
    "trainer.analysis": {"trainer.bench", "pipeline.bench", "cli"},
    "trainer.bench": set(),  # a benchmark may drive a CLI as a user would (bench/scorers runs dynaprep index)
    "pipeline.bench": {"cli", "trainer.core", "trainer.methods", "trainer.infer", "trainer.analysis",
                       "trainer.bench"},
}


def room_problems(g: dict[str, set[str]]) -> list[str]:
    return [f"{m} ({room(m)}) imports {d} ({room(d)})" for m, deps in sorted(g.items()) for d in sorted(deps)
            if room(d) in FORBIDDEN.get(room(m), set())]


def test_every_dynavit_import_names_a_module_that_exists():
    assert unknown_imports() == []


def test_no_import_circle():
    assert cycles(graph()) == []


def test_rooms_import_only_what_their_docstrings_allow():
    assert room_problems(graph()) == []


def test_no_module_over_500_lines_and_no_function_over_80():
    long = []
    for name, path in modules().items():
        text = path.read_text()
        if len(text.splitlines()) > 500:
            long.append(f"{path.relative_to(ROOT)}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80:
                long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: "
                            f"{node.end_lineno - node.lineno + 1} lines")
    assert long == []


def test_every_package_says_what_lives_there():
    for name, path in modules().items():
        if path.name == "__init__.py" and name.count(".") >= 2 and "sources" not in name:
            doc = ast.get_docstring(ast.parse(path.read_text()))
            assert doc and len(doc) > 80, f"{path.relative_to(ROOT)} has no docstring saying what lives there"


@pytest.mark.parametrize("planted, expect", [
    ({"a.py": "from dynavit.pipeline import b\n", "b.py": "def f():\n    from dynavit.pipeline import a\n"}, "cycle"),
    ({"a.py": "import dynavit.trainer.infer.x\n"}, "room"),
])
def test_the_checks_catch_a_planted_circle_and_a_forbidden_import(tmp_path, planted, expect):
    for folder in PACKAGES:
        (tmp_path / folder).mkdir()
    (tmp_path / "trainer" / "infer").mkdir()
    (tmp_path / "trainer" / "infer" / "x.py").write_text("")
    target = "pipeline" if expect == "cycle" else "trainer/methods"
    (tmp_path / target).mkdir(exist_ok=True)
    for fname, text in planted.items():
        (tmp_path / target / fname).write_text(text)
    g = graph(tmp_path)
    if expect == "cycle":
        assert cycles(g) == [["dynavit.pipeline.a", "dynavit.pipeline.b"]]
    else:
        assert room_problems(g) == ["dynavit.trainer.methods.a (trainer.methods) imports dynavit.trainer.infer.x "
                                    "(trainer.infer)"]
