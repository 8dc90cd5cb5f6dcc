"""The layout is the architecture: four tiers, dependencies pointing one way, no import loops.

alast_cli -> alast (the pipeline) -> runtimes (backends) -> planners (the math). Every import
counts, including those inside functions, so a lazy import cannot hide an upward dependency.
"""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TIERS = ["alast_cli", "alast", "runtimes", "planners"]  # each may import only those after it


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path) -> set[str]:
    """Project modules imported anywhere in ``path`` (relative imports resolved)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return {m for m in found if m.split(".")[0] in TIERS}


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for tier in TIERS for p in (ROOT / tier).rglob("*.py")}
    graph = {}
    for mod, path in modules.items():
        # a module's own parent packages are already being imported when it runs: not an edge
        graph[mod] = {m for m in _imports(path) if m in modules and not (mod + ".").startswith(m + ".")}
    return graph


def test_top_level_packages_are_this_projects():
    import alast
    import alast_cli
    import planners
    import runtimes

    for mod in (alast, alast_cli, planners, runtimes):
        assert pathlib.Path(mod.__file__).resolve().parent.parent == ROOT


@pytest.mark.parametrize("tier", TIERS)
def test_dependencies_point_one_way(tier):
    allowed = set(TIERS[TIERS.index(tier):])
    bad = [f"{mod} imports {dep}" for mod, deps in _graph().items() if mod.split(".")[0] == tier
           for dep in deps if dep.split(".")[0] not in allowed]
    assert not bad, "upward imports: " + "; ".join(sorted(bad))


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycles.append(" -> ".join(stack[stack.index(dep):] + [dep]) if dep in stack else dep)
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles: " + "; ".join(cycles)


def test_the_analysis_sees_lazy_and_relative_imports():
    graph = _graph()
    assert "runtimes.protocol" in graph["runtimes.ort_backend.runtime"]  # `from ..protocol import`
    assert "alast.training.resume" in graph["alast.training.loop"]  # imported inside a method
