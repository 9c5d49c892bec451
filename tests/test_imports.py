"""The modules of cntk_gram.pipeline import each other one way only: no cycle, and each module imports only
the modules its layer allows (docs/ARCHITECTURE.md draws the same table)."""
import ast
import importlib.util
from pathlib import Path

PACKAGE = "cntk_gram.pipeline"

# module -> the pipeline modules it may import; every module may also import `errors`
ALLOWED = {
    # cli -> cluster: only `cntk tls`, which makes a cluster's certificate and belongs to no run
    "cli": {"run", "inspect", "predict", "experiment", "ridge", "curve", "report", "cluster", "config"},
    "experiment": {"run", "solve", "ridge", "curve", "results", "report", "paper", "store", "config"},
    "run": {"cluster", "tasks", "predict", "store", "records", "data", "plan", "config"},
    "predict": {"store", "results", "curve", "ridge", "linalg"},
    "inspect": {"store", "records", "data", "plan"},
    "solve": {"curve", "ridge", "linalg", "results", "store"},
    "curve": {"ridge", "linalg"},
    "ridge": {"linalg"},
    "linalg": set(),
    "report": {"paper", "results", "curve"},
    "results": set(),
    "paper": set(),
    "cluster": {"config"},
    "tasks": {"store", "records", "plan"},
    "store": {"records", "data", "plan", "config"},
    "records": set(),
    "data": {"config"},
    "plan": set(),
    "config": set(),
    "errors": set(),
}


def pipeline_imports(source: str, *, package: str = PACKAGE) -> set[str]:
    """Names of the `package` modules that `source` imports, at top level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package if node.level else (node.module or "")
            if node.level and node.module:
                base = f"{package}.{node.module}"
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    prefix = package + "."
    return {name[len(prefix):].split(".")[0] for name in found if name.startswith(prefix)}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle [a, b, ..., a] of the directed graph {node: successors}, or None."""
    state = {}  # node -> "open" while on the DFS path, "done" after

    def visit(node, path):
        state[node] = "open"
        for succ in sorted(graph.get(node, ())):
            if state.get(succ) == "open":
                return path[path.index(succ):] + [succ]
            if succ not in state:
                cycle = visit(succ, path + [succ])
                if cycle:
                    return cycle
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start, [start])
            if cycle:
                return cycle
    return None


def import_graph(package: str = PACKAGE) -> dict[str, set[str]]:
    folder = Path(importlib.util.find_spec(package).submodule_search_locations[0])
    modules = sorted(p.stem for p in folder.glob("*.py") if p.stem != "__init__")
    return {m: pipeline_imports((folder / f"{m}.py").read_text(), package=package) - {m} for m in modules}


def test_the_pipeline_import_graph_has_no_cycle():
    graph = import_graph()
    assert len(graph) >= 10, graph  # the package was found and parsed
    assert find_cycle(graph) is None, find_cycle(graph)


def test_the_workers_import_graph_has_no_cycle():
    """cntk_gram.workers has no layer table, but no cycle either: the numba lock that cpu and fc share lives in
    `_lock`, which, like `vocab`, imports nothing of the package (docs/ARCHITECTURE.md, "workers")."""
    graph = import_graph("cntk_gram.workers")
    assert {"cpu", "fc", "_lock", "vocab"} <= set(graph), graph
    assert find_cycle(graph) is None, find_cycle(graph)
    assert graph["_lock"] == graph["vocab"] == set()
    assert "cpu" not in graph["fc"]


def test_every_module_imports_only_what_its_layer_allows():
    graph = import_graph()
    assert set(graph) == set(ALLOWED), "place new or removed modules in ALLOWED and docs/ARCHITECTURE.md"
    wrong = {m: sorted(imports - ALLOWED[m] - {"errors"}) for m, imports in graph.items()
             if imports - ALLOWED[m] - {"errors"}}
    assert not wrong, wrong


def test_the_allowed_table_itself_has_no_cycle():
    assert find_cycle({m: allowed | ({"errors"} if m != "errors" else set()) for m, allowed in ALLOWED.items()}) is None


def test_the_checker_finds_cycles_and_nested_imports():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"b"}}) == ["b", "b"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
    source = '''
import os
from cntk_gram.pipeline.store import layout
import cntk_gram.pipeline.records as records
from cntk_gram.pipeline import config, plan
from . import data
from .tasks import run_tile

def f():
    from cntk_gram.pipeline.run import run  # a function-level import counts too
'''
    assert pipeline_imports(source) == {"store", "records", "config", "plan", "data", "tasks", "run"}
    cyclic = {"store": pipeline_imports("def g():\n    from cntk_gram.pipeline.tasks import run_tile\n"),
              "tasks": pipeline_imports("from cntk_gram.pipeline.store import layout\n")}
    assert find_cycle(cyclic) == ["store", "tasks", "store"]
