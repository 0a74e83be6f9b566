"""The layout contract: the top level holds only the reading path, and the project's imports,
counting those inside functions, form no circle and run one way.

The import graph is read from the source with `ast`, so an import hidden in a function or under
`if __name__ == "__main__"` counts like any other.
"""
import ast
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
READING_PATH = {"cmki.py", "model.py", "data.py", "train.py", "eval.py"}
PACKAGES = ("prepare", "kernels", "analysis")


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules(root: Path) -> dict:
    """{module name: file} for the top-level files and the packages' files."""
    files = list(root.glob("*.py")) + [f for p in PACKAGES for f in (root / p).glob("*.py")]
    return {module_name(f, root): f for f in files}


def imports_of(path: Path, known: set) -> set:
    """Project modules imported anywhere in `path` (module level, functions, __main__ blocks)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from prepare import summarize` imports prepare.summarize, not only prepare
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found |= {n for n in names if n in known}
    return found


def import_graph(root: Path) -> dict:
    mods = project_modules(root)
    return {m: imports_of(f, set(mods)) - {m} for m, f in mods.items()}


def find_cycle(graph: dict):
    """A list of modules that import each other in a circle, or None (depth-first search)."""
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == "open":
                return stack[stack.index(n):] + [n]
            if n not in state and (cycle := visit(n)):
                return cycle
        state[m] = "done"
        stack.pop()
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_top_level_is_the_reading_path():
    tracked = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True)
    if tracked.returncode != 0:
        pytest.skip("not a git checkout")
    top = {p for p in tracked.stdout.split() if "/" not in p}
    assert top == READING_PATH, f"top-level Python files: {sorted(top)}"


def test_import_graph_has_no_circle():
    graph = import_graph(ROOT)
    assert {"cmki", "model", "data", "train", "eval", "prepare.summarize"} <= set(graph)
    assert find_cycle(graph) is None, f"import circle: {' -> '.join(find_cycle(graph))}"


def test_the_checker_sees_circles_inside_functions(tmp_path):
    (tmp_path / "cmki.py").write_text("import model\n")
    (tmp_path / "model.py").write_text("def f():\n    from prepare import phantom\n")
    (tmp_path / "prepare").mkdir()
    (tmp_path / "prepare" / "__init__.py").write_text("")
    (tmp_path / "prepare" / "phantom.py").write_text("if __name__ == '__main__':\n    import cmki\n")
    assert find_cycle(import_graph(tmp_path)) == ["cmki", "model", "prepare.phantom", "cmki"]
    (tmp_path / "prepare" / "phantom.py").write_text("import data\n")
    assert find_cycle(import_graph(tmp_path)) is None


def test_data_flows_one_way():
    graph = import_graph(ROOT)
    method = [m for m in graph if m in ("cmki", "model") or m.startswith("kernels.")]
    for m in method + ["data"]:
        bad = sorted(n for n in graph[m] if n.startswith("prepare") or n in ("train", "eval"))
        assert not bad, f"{m} imports {bad}"
    for op in ("kernels.bank_attention", "kernels.similarity"):
        assert not {"kernels.bench", "kernels.aot"} & graph[op], f"{op} imports its benchmark"
    for m in [m for m in graph if m.startswith("analysis")] + [m for m in method]:
        bad = sorted(n for n in graph[m] if n in ("train", "eval") or
                     (m in method and n.startswith("analysis")))
        assert not bad, f"{m} imports {bad}: the instruments serve eval.py, never the other way"
    assert "eval" not in {n for m in graph if m.startswith("prepare") for n in graph[m]}
    assert "train" not in graph["eval"], "eval.py reads checkpoints through prepare/files.py"


def test_no_front_doors():
    """No module-level __getattr__ (lazy re-exports) and no re-exporting package __init__."""
    for m, f in project_modules(ROOT).items():
        tree = ast.parse(f.read_text(encoding="utf-8"))
        assert not any(isinstance(n, ast.FunctionDef) and n.name == "__getattr__" for n in tree.body), m
        if f.name == "__init__.py":
            assert not any(isinstance(n, (ast.Import, ast.ImportFrom)) for n in tree.body), m


def defined_names(path: Path) -> set:
    """Names a module defines itself at top level (functions, classes, assignments)."""
    names = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
    return names


def test_names_are_imported_from_where_they_are_defined():
    mods = project_modules(ROOT)
    files = list(mods.values()) + sorted((ROOT / "tests").glob("*.py")) + sorted((ROOT / "benchmarks").glob("*.py"))
    for f in files:
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if not (isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in mods):
                continue
            for a in node.names:
                if f"{node.module}.{a.name}" in mods:
                    continue  # a module of a package: `from prepare import summarize`
                assert a.name in defined_names(mods[node.module]), \
                    f"{f.relative_to(ROOT)}: {a.name} is not defined in {node.module}"
