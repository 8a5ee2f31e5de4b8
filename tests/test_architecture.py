"""The package's architecture, checked on every test run: the layers contract (``.importlinter``:
no arrow runs up a floor), no import circle anywhere (also inside a package and through imports
placed inside functions), the code lint (ruff, ``pyproject.toml``), method names only inside
``methods/``, and files short enough to read."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "ds_relora"
MAX_LINES = 350


def _tool(name: str) -> str:
    path = Path(sys.executable).parent / name
    assert path.is_file(), f"{name} is not installed next to {sys.executable}: run bash scripts/setup.sh (test extras)"
    return str(path)


def test_layers_contract_holds():
    """import-linter's report: each floor imports only the floors below it."""
    proc = subprocess.run([_tool("lint-imports"), "--no-cache"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


def _strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's components of size > 1 (iterative: the graph is a few hundred edges)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    member = stack.pop()
                    on.discard(member)
                    comp.append(member)
                    if member == node:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_no_import_circle():
    grimp = pytest.importorskip("grimp", reason="grimp comes with import-linter (test extras)")
    graph = grimp.build_graph("ds_relora", cache_dir=None)
    edges = {m: set(graph.find_modules_directly_imported_by(m)) for m in graph.modules}
    assert _strongly_connected(edges) == []


def test_strongly_connected_finds_a_circle():
    """The checker above can fail: a planted circle is found."""
    assert _strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_ruff_is_clean():
    proc = subprocess.run([_tool("ruff"), "check", "--no-cache", "ds_relora", "tests", "benchmarks", "scripts"],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def _python_files():
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_method_names_are_compared_only_inside_methods():
    """A new method is one file in methods/: nothing else may test for a method by its name
    (config.py's schema lists the names; a test holds that list equal to the registry)."""
    from ds_relora.methods import METHODS

    names = set(METHODS) - {"full"}  # "full" is also the name of the full-rank *phase*
    found = []
    for path in _python_files():
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] == "methods" or rel.name == "config.py":
            continue
        tree = ast.parse(path.read_text())
        # A config section of the same name (``{"galore": {...}}``, ``raw["relora"]``) is config, not a method.
        sections = {id(k) for n in ast.walk(tree) if isinstance(n, ast.Dict) for k in n.keys if k is not None}
        sections |= {id(n.slice) for n in ast.walk(tree) if isinstance(n, ast.Subscript)}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names
                    and id(node) not in sections):
                found.append(f"{rel}:{node.lineno} {node.value!r}")
    assert found == []


def test_the_cli_starts_without_torch():
    """``ds-relora --help`` and argument errors stay instant: the imports placed inside functions
    (each with its reason) keep torch, deepspeed and transformers out of the CLI's start-up."""
    code = "import sys, ds_relora.cli; heavy = {'torch', 'deepspeed', 'transformers'} & set(sys.modules); print(sorted(heavy))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_files_are_short_or_say_why():
    """A file over MAX_LINES lines says in its module docstring why it is long."""
    long = []
    for path in _python_files():
        lines = path.read_text().count("\n")
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        if lines > MAX_LINES and "Long because" not in doc:
            long.append(f"{path.relative_to(REPO)} ({lines} lines)")
    assert long == []
