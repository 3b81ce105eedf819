"""The core's layers run one way: the import graph of mmlg_ray's core modules (outside
mmlg_ray/distributed), module-level and function-local imports alike, has no cycle; the core never
imports ray; the report reads results and the cost model, never the pipeline."""

import ast
import importlib
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parents[1] / "mmlg_ray"
MODULES = sorted(p.stem for p in CORE.glob("*.py") if p.stem != "__init__")


def imports_of(name: str) -> tuple[set[str], set[str]]:
    """(core modules `name` imports, top-level packages it imports), from its source."""
    core, packages = set(), set()
    for n in ast.walk(ast.parse((CORE / f"{name}.py").read_text())):
        if isinstance(n, ast.ImportFrom) and n.level == 1:
            core |= {n.module.split(".")[0]} if n.module else {a.name for a in n.names}
        elif isinstance(n, ast.ImportFrom) and n.level == 0 and n.module:
            packages.add(n.module.split(".")[0])
            if n.module.startswith("mmlg_ray."):
                core.add(n.module.split(".")[1])
        elif isinstance(n, ast.Import):
            for a in n.names:
                packages.add(a.name.split(".")[0])
                if a.name.startswith("mmlg_ray."):
                    core.add(a.name.split(".")[1])
        elif isinstance(n, ast.ImportFrom) and n.level > 1:
            packages.add("mmlg_ray")  # above the core: would be caught below as not a core module
    return core, packages


GRAPH = {m: imports_of(m)[0] for m in MODULES}


def test_core_import_graph_is_acyclic():
    state = {}

    def visit(m, path):
        if state.get(m) == "done":
            return
        assert state.get(m) != "open", "import cycle: " + " -> ".join(path + [m])
        state[m] = "open"
        for d in sorted(GRAPH[m]):
            assert d in GRAPH, f"{m} imports {d}, which is not a core module"
            visit(d, path + [m])
        state[m] = "done"

    for m in MODULES:
        visit(m, [])


def test_the_checker_sees_a_cycle():
    """The cycle check can fail: the graph with one back edge added (learngene -> pipeline) has one."""
    saved = set(GRAPH["learngene"])
    GRAPH["learngene"].add("pipeline")
    try:
        with pytest.raises(AssertionError, match="import cycle"):
            test_core_import_graph_is_acyclic()
    finally:
        GRAPH["learngene"] = saved


@pytest.mark.parametrize("name", MODULES)
def test_core_module_imports_without_ray(name):
    assert "ray" not in imports_of(name)[1], f"mmlg_ray/{name}.py imports ray"
    assert "distributed" not in GRAPH[name], f"mmlg_ray/{name}.py imports mmlg_ray.distributed"
    importlib.import_module(f"mmlg_ray.{name}")


def test_lower_layers_do_not_import_the_pipeline():
    for name in ("ancestor", "report", "learngene", "pretrain", "train", "cost", "results"):
        assert "pipeline" not in GRAPH[name], f"{name} imports pipeline"
    assert GRAPH["spec"] <= {"errors"}
