"""The package's structure, read from the source (ast; no module is imported):

* its modules import one another without a circle: the layers depend downward only (quant math, packed format,
  ops, modules, algorithms, pipeline, CLI). Lazy imports (inside functions) are counted too, stricter than the
  module-level graph alone: a lazy import that closes a circle still ties the two layers together;
* no source file is longer than ``MAX_LINES``, except those in ``LONG_FILES_ALLOWED`` (each with its reason).
"""

import ast
from fnmatch import fnmatch
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
MAX_LINES = 450
# path under src/ (fnmatch pattern) -> why it may be longer for now; the goal is an empty allow-list
LONG_FILES_ALLOWED = {
}


def import_graph(src: Path = SRC) -> dict[str, set[str]]:
    """{module: gqsa modules it imports anywhere in its code}, from the source files."""
    modules = {}
    for path in src.joinpath("gqsa").rglob("*.py"):
        name = ".".join(path.relative_to(src).with_suffix("").parts)
        modules[name.removesuffix(".__init__")] = path
    graph = {m: set() for m in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("gqsa"):
                targets.append(node.module)
                targets += [f"{node.module}.{a.name}" for a in node.names]  # "from gqsa.ops import cpu"
            elif isinstance(node, ast.Import):
                targets += [a.name for a in node.names]
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def a_cycle(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """One import path around a circle inside ``component`` (a strongly connected component), first module
    repeated at the end: what to read to cut it."""
    inside = set(component)
    start = component[0]
    path, seen = [start], {start}
    while True:  # every module of the component imports another one of it: walk until a module repeats
        nxt = sorted(graph[path[-1]] & inside)[0]
        if nxt in seen:
            return path[path.index(nxt):] + [nxt]
        path.append(nxt)
        seen.add(nxt)


def test_no_import_circle():
    graph = import_graph()
    assert len(graph) > 50 and graph["gqsa.ops.linear"]  # the walk found the package and its imports
    found = circles(graph)
    assert not found, "import circles:\n" + "\n".join(" -> ".join(a_cycle(graph, c)) for c in found)


def test_a_circle_is_found():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert circles(graph) == [["a", "b", "c"]]
    assert a_cycle(graph, ["a", "b", "c"]) == ["a", "b", "c", "a"]


def long_files(src: Path = SRC, limit: int = MAX_LINES) -> dict[str, int]:
    """{path under src: line count} of the package's Python files longer than ``limit`` and not allowed."""
    found = {}
    for path in sorted(src.joinpath("gqsa").rglob("*.py")):
        name = path.relative_to(src).as_posix()
        lines = len(path.read_text(encoding="utf-8").splitlines())
        if lines > limit and not any(fnmatch(name, pattern) for pattern in LONG_FILES_ALLOWED):
            found[name] = lines
    return found


def test_no_source_file_is_too_long():
    assert long_files() == {}, f"split these files (over {MAX_LINES} lines): {long_files()}"


def test_a_long_file_is_found(tmp_path, monkeypatch):
    monkeypatch.setitem(LONG_FILES_ALLOWED, "gqsa/cli.py", "a reason")
    monkeypatch.setitem(LONG_FILES_ALLOWED, "gqsa/bench/*", "a reason")
    (tmp_path / "gqsa" / "bench").mkdir(parents=True)
    (tmp_path / "gqsa" / "a.py").write_text("x = 1\n" * 3)
    (tmp_path / "gqsa" / "cli.py").write_text("x = 1\n" * 3)  # allowed
    (tmp_path / "gqsa" / "bench" / "b.py").write_text("x = 1\n" * 3)  # allowed
    (tmp_path / "gqsa" / "c.py").write_text("x = 1\n" * 2)
    assert long_files(tmp_path, limit=2) == {"gqsa/a.py": 3}
