"""The core's layers run one way. The core is every module of mmlg_ray outside its Ray edge
(mmlg_ray/distributed) and its command line (mmlg_ray/cli). Its import graph, module-level and
function-local imports alike, has no cycle; the core never imports ray; the method, the data and
the cost model never import the engine or the report; the report reads results and the cost model,
never the pipeline."""

import ast
import importlib
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parents[1] / "mmlg_ray"
EDGE = ("distributed", "cli")


def _name(p: Path) -> str:
    parts = p.relative_to(CORE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


FILES = {_name(p): p for p in sorted(CORE.rglob("*.py")) if p.relative_to(CORE).parts[0] not in EDGE and _name(p) != ""}
MODULES = sorted(FILES)


def _resolve(dotted: str, names=()) -> set[str]:
    """The core modules that `from mmlg_ray.<dotted> import names` (or `import mmlg_ray.<dotted>`) reads."""
    found = {f"{dotted}.{n}" if dotted else n for n in names}
    hit = {m for m in found if m in FILES or m.split(".")[0] in EDGE}
    return hit or {dotted}


def imports_of(name: str) -> tuple[set[str], set[str]]:
    """(core modules `name` imports, top-level packages it imports), from its source."""
    core, packages = set(), set()
    for n in ast.walk(ast.parse(FILES[name].read_text())):
        if isinstance(n, ast.ImportFrom) and n.level:
            raise AssertionError(f"{name}: relative import (the core imports mmlg_ray.<module> by its full name)")
        if isinstance(n, ast.ImportFrom) and n.module:
            packages.add(n.module.split(".")[0])
            if n.module == "mmlg_ray" or n.module.startswith("mmlg_ray."):
                core |= _resolve(n.module[len("mmlg_ray.") :] if "." in n.module else "", [a.name for a in n.names])
        elif isinstance(n, ast.Import):
            for a in n.names:
                packages.add(a.name.split(".")[0])
                if a.name.startswith("mmlg_ray."):
                    core |= _resolve(a.name[len("mmlg_ray.") :])
    return core - {name}, packages


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
    saved = set(GRAPH["method.learngene"])
    GRAPH["method.learngene"].add("engine.pipeline")
    try:
        with pytest.raises(AssertionError, match="import cycle"):
            test_core_import_graph_is_acyclic()
    finally:
        GRAPH["method.learngene"] = saved


def test_the_checker_sees_the_packages():
    assert {"method.learngene", "engine.job", "report", "data", "cost"} <= set(MODULES)
    assert not any(m.split(".")[0] in EDGE for m in MODULES)
    assert {"engine.pipeline", "method.learngene", "config"} <= GRAPH["engine.job"]


@pytest.mark.parametrize("name", MODULES)
def test_core_module_imports_without_ray(name):
    assert "ray" not in imports_of(name)[1], f"{FILES[name]} imports ray"
    assert not {d for d in GRAPH[name] if d.split(".")[0] in EDGE}, f"{FILES[name]} imports the Ray edge or the CLI"
    importlib.import_module(f"mmlg_ray.{name}")


def _layer(m: str) -> str:
    return m.split(".")[0]


def test_lower_layers_do_not_import_higher_ones():
    for m in MODULES:
        if _layer(m) in ("method", "data"):
            bad = {d for d in GRAPH[m] if _layer(d) in ("engine", "report")}
            assert not bad, f"{m} imports {sorted(bad)}"
        if _layer(m) == "cost":
            bad = {d for d in GRAPH[m] if _layer(d) in ("engine", "report")}
            assert not bad, f"{m} imports {sorted(bad)}"
        if _layer(m) == "report":
            assert not GRAPH[m] & {"engine.pipeline", "engine.job"}, f"{m} imports the pipeline"
    assert GRAPH["method.spec"] <= {"errors"}


def test_no_module_is_much_over_500_lines():
    sizes = {str(p.relative_to(CORE.parent)): len(p.read_text().splitlines()) for p in CORE.rglob("*.py")}
    assert not {k: v for k, v in sizes.items() if v > 600}, "split these modules"


def test_the_model_vocabulary_is_below_config_data_and_cost():
    """The packages lean on one another only through the model's vocabulary: config, data and cost
    read method.spec and method.models (and cost's calibration the training step), nothing else of
    the method; spec and models read nothing of the method's stages."""
    vocabulary = {"method.spec", "method.models"}
    for m in MODULES:
        method = {d for d in GRAPH[m] if _layer(d) == "method"}
        if _layer(m) in ("config", "data"):
            assert method <= vocabulary, f"{m} imports {sorted(method - vocabulary)}"
        if _layer(m) == "cost":
            allowed = vocabulary | ({"method.train", "method.precision"} if m == "cost.calibrate" else set())
            assert method <= allowed, f"{m} imports {sorted(method - allowed)}"
    assert GRAPH["method.models"] <= {"errors", "method.spec"}
