"""The package's shape: no import cycle in ``dalle`` or ``dalle_kernels`` (imports inside functions included), no
command module used as a library (``dalle.train`` is imported by the pipeline alone), and no docstring or
comment that cites a file outside the repository."""
import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = {"dalle": REPO / "python" / "dalle", "dalle_kernels": REPO / "dalle_kernels"}


def modules() -> dict:
    """``{dotted name: path}`` of every module of both packages."""
    out = {}
    for pkg, root in PACKAGES.items():
        for path in root.rglob("*.py"):
            parts = path.relative_to(root.parent).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def imports(mods: dict) -> dict:
    """``{module: {module it imports}}`` within the packages, from every import statement anywhere in the file."""
    graph = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(up + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            else:
                continue
            edges.update(t for t in targets if t in mods and t != name)
        graph[name] = edges
    return graph


def cycles(graph: dict) -> list:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    graph = imports(modules())
    assert "dalle.train" in graph["dalle.pipeline"] and "dalle.runs" in graph["dalle.generate"]  # the parse works
    assert cycles(graph) == []


def test_only_the_pipeline_imports_the_trainers():
    graph = imports(modules())
    for trainer in ("dalle.train", "dalle.train_dvae"):
        users = sorted(m for m, deps in graph.items() if trainer in deps)
        assert users == ["dalle.pipeline"], (trainer, users)


def test_no_file_outside_the_repository_is_cited():
    cited = re.compile(r"\bSPEC\.md\b|\bSTYLE\.md\b")
    bad = [str(p.relative_to(REPO)) for p in REPO.rglob("*")
           if p.suffix in (".py", ".md", ".cu", ".h", ".cpp", ".sh", ".toml") and ".git" not in p.parts
           and cited.search(p.read_text(errors="replace"))]
    assert not bad, bad
