"""No import cycles among minisd/, regulation/ and tools/. Every import statement counts, at the top of a module or
inside a function, so the floors read one way: model parts -> loading -> pipelines -> regulation -> the command line
and the page -> tools."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def module_name(path, root):
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root, packages):
    """{module: the project's modules it imports}, read from every Import and ImportFrom node of every file."""
    files = {module_name(p, root): p for pkg in packages for p in sorted((Path(root) / pkg).rglob("*.py"))}
    graph = {}
    for name, path in files.items():
        graph[name] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                named = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:   # relative: from the module's package, one package up per further dot
                    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                    base = ".".join(package[:len(package) - node.level + 1] + [base] * bool(base))
                named = [base] + [f"{base}.{a.name}" for a in node.names]   # `from pkg import module` too
            else:
                continue
            for n in named:
                while n and n not in files:   # a name inside a module, or outside the project
                    n = n.rpartition(".")[0]
                # a module's own package (its __init__) runs first anyway: not a dependency of the design
                if n and n != name and not name.startswith(n + "."):
                    graph[name].add(n)
    return graph


def cycles(graph):
    """One cycle per back edge of a depth-first walk, as [a, b, ..., a]; none when every import points one way."""
    found, state, path = [], {}, []

    def visit(v):
        state[v] = "open"
        path.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == "open":
                found.append(path[path.index(w):] + [w])
            elif w not in state:
                visit(w)
        path.pop()
        state[v] = "done"

    for v in sorted(graph):
        if v not in state:
            visit(v)
    return found


def test_no_import_cycles():
    graph = import_graph(ROOT, ("minisd", "regulation", "tools"))
    assert graph["minisd.loading"] >= {"minisd.checkpoint", "minisd.diffusers_folder"}, "the walk missed imports"
    found = cycles(graph)
    assert not found, "import cycles: " + "; ".join(" -> ".join(c) for c in found)


def test_a_planted_cycle_is_named(tmp_path):
    """Two cycles: one through an import inside a function, one through relative imports across a subpackage;
    a module that imports into a cycle is not part of it."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    for path, text in {"__init__.py": "", "sub/__init__.py": "",
                       "a.py": "import os\nfrom . import b\n",
                       "b.py": "def f():\n    from .a import g\n",
                       "c.py": "import pkg.a\nfrom .sub import d\n",
                       "sub/d.py": "from ..c import y\n",
                       "e.py": "from pkg.c import z\n"}.items():
        (pkg / path).write_text(text)
    graph = import_graph(tmp_path, ["pkg"])
    assert cycles(graph) == [["pkg.a", "pkg.b", "pkg.a"], ["pkg.c", "pkg.sub.d", "pkg.c"]]
    graph["pkg.b"].clear()
    graph["pkg.sub.d"].clear()
    assert cycles(graph) == []   # the control: the same modules, imports one way
