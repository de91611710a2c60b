"""The package's import graph: no cycle, every module importable on its own, the cache key's sources.

The graph is read from the source with ``ast`` (every ``import`` of a bnpass module, at module level
or inside a function), over ``bnpass/`` and ``backends/`` (``bnpass.backends``). Importing a
submodule also runs its parent packages' ``__init__``: those are edges too, except a package the
importer is itself inside (it is already being imported).
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import networkx as nx
import pytest

REPO = Path(__file__).resolve().parent.parent
ROOTS = {"bnpass": REPO / "bnpass", "bnpass.backends": REPO / "backends"}

# Deferred imports (inside a function) that close a cycle, each with its reason. Keep this short:
# a new entry needs a reason as good as these.
DEFERRED_CYCLES = {
    ("bnpass.ops", "bnpass.backends.triton_bn_op"):
        "the Triton path is loaded only for a kernels='triton' site (importing bnpass never imports "
        "triton); triton_bn_op reuses ops' cross-rank statistics (global_statistics, "
        "global_grad_means), which would need a module of their own to cut this edge",
}


def _modules() -> dict[str, Path]:
    """Module name -> file, for every module of the package."""
    found = {}
    for root_name, folder in ROOTS.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            name = ".".join([root_name, *parts])
            if root_name == "bnpass" and name.startswith("bnpass.backends"):
                continue  # an installed layout; the source tree maps backends/ itself
            found[name] = path
    return found


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _imports(name: str, path: Path, modules: dict) -> list[tuple[str, bool, int]]:
    """(imported bnpass module, deferred?, line) for every import in one module."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []

    def targets(node) -> list[str]:
        if isinstance(node, ast.Import):
            return [alias.name for alias in node.names]
        base = node.module or ""
        if node.level:
            anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
            base = ".".join(anchor + ([node.module] if node.module else []))
        return [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]

    def visit(node, deferred: bool):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                for target in targets(child):
                    while target and target not in modules:  # import a.b.c binds a, loads a.b.c
                        target = target.rpartition(".")[0]
                    if not target or target == name:
                        continue
                    for t in [*_ancestors(target), target]:
                        if t in modules and t != name and t not in _ancestors(name):
                            out.append((t, deferred, child.lineno))
            elif isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            else:
                visit(child, deferred or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(ast.parse(path.read_text(), str(path)), False)
    return out


def _graph(include_deferred: bool) -> nx.DiGraph:
    modules = _modules()
    graph = nx.DiGraph()
    graph.add_nodes_from(modules)
    for name, path in modules.items():
        for target, deferred, line in _imports(name, path, modules):
            if include_deferred or not deferred:
                graph.add_edge(name, target, where=f"{path.relative_to(REPO)}:{line}")
    return graph


def _cycle_message(graph: nx.DiGraph) -> str:
    cycle = nx.find_cycle(graph)
    return "import cycle: " + " -> ".join(f"{a} ({graph.edges[a, b]['where']})" for a, b in cycle) \
        + f" -> {cycle[-1][1]}"


def test_the_graph_sees_the_package():
    """The walk finds the pass, the inspector and the lowerings, and their known imports."""
    graph = _graph(include_deferred=True)
    assert {"bnpass", "bnpass.options", "bnpass.groups", "bnpass.inspect", "bnpass.inspect.cli",
            "bnpass.backends", "bnpass.backends.inductor"} <= set(graph)
    assert graph.has_edge("bnpass.options", "bnpass.groups")
    assert graph.has_edge("bnpass.backend", "bnpass.inspect.capture")
    assert graph.has_edge("bnpass.backend", "bnpass.inspect")  # the subpackage's __init__ runs
    assert graph.has_edge("bnpass.inspect.capture", "bnpass.ops")  # from ..ops import ...
    assert graph.has_edge("bnpass.backend", "bnpass.backends.inductor")  # deferred, inside lower()
    assert not graph.has_edge("bnpass.inspect.capture", "bnpass")  # its own parent: no edge


def test_no_import_cycle_at_import_time():
    graph = _graph(include_deferred=False)
    assert nx.is_directed_acyclic_graph(graph), _cycle_message(graph)


def test_no_import_cycle_through_deferred_imports():
    graph = _graph(include_deferred=True)
    for edge in DEFERRED_CYCLES:
        assert graph.has_edge(*edge), f"{edge} is no longer imported: remove it from DEFERRED_CYCLES"
    graph.remove_edges_from(DEFERRED_CYCLES)
    assert nx.is_directed_acyclic_graph(graph), _cycle_message(graph)


# Each module imported first, alone, in a fresh process: forked from one that imported torch and the
# other heavy third-party modules but nothing of bnpass (one interpreter start instead of one each).
_EACH_ALONE = textwrap.dedent("""
    import os, sys, traceback
    import networkx, torch, torch.distributed, torch.fx, torch._dynamo
    import torch._inductor.compile_fx, torch._functorch.aot_autograd
    assert not [m for m in sys.modules if m.startswith("bnpass")]
    failed = []
    for name in sys.argv[1:]:
        pid = os.fork()
        if pid == 0:
            try:
                __import__(name)
                if name == "bnpass":  # the pass does not load the inspector's command line
                    loaded = sorted(m for m in sys.modules if m.startswith("bnpass.inspect."))
                    assert loaded == ["bnpass.inspect.capture"], loaded
            except BaseException:
                traceback.print_exc()
                os._exit(1)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        if status:
            failed.append(name)
    print("FAILED", failed)
    sys.exit(1 if failed else 0)
""")


@pytest.mark.slow  # about 40 s of CPU: a bnpass import per module; the ast checks above are the default
@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_each_module_imports_first_on_its_own():
    names = sorted(set(_modules()) - {"bnpass.__main__"})  # a script: it runs the command line
    proc = subprocess.run([sys.executable, "-c", _EACH_ALONE, *names], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "FAILED []" in proc.stdout


def test_cache_key_hashes_every_module_of_the_pass_and_none_of_the_inspector():
    from bnpass.backends.inductor import hashed_sources

    hashed = {p.resolve() for p in hashed_sources()}
    modules = _modules()
    want = {path.resolve() for name, path in modules.items() if not name.startswith("bnpass.inspect")}
    assert hashed == want
