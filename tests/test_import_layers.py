"""The package's layers: imports run downward only (quant -> codec -> comm -> train -> sim -> cli) and no
module of lowbit/ imports itself back through others (no cycle)."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "lowbit"
# a package may import only packages of a lower layer
LAYER = {"errors": 0, "progress": 0, "quant": 1, "codec": 2, "comm": 3, "models": 3, "net": 3, "train": 4,
         "sim": 5, "testing": 5, "integrations": 6, "demo": 6, "benchmarks": 6, "cli": 7}


def _module(p: Path) -> str:
    parts = list(p.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _target(module: str, name: str) -> str:
    """``from module import name``: the submodule when ``name`` is one (a .py, a package or an
    extension), else the module itself."""
    sub = ROOT.parent / (module + "." + name).replace(".", "/")
    return f"{module}.{name}" if sub.is_dir() or list(sub.parent.glob(sub.name + ".*")) else module


def import_graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for p in ROOT.rglob("*.py"):
        m, out = _module(p), set()
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "lowbit" and not node.level:
                out |= {_target(node.module, a.name) for a in node.names}
            elif isinstance(node, ast.Import):
                out |= {a.name for a in node.names if a.name.split(".")[0] == "lowbit"}
        edges[m] = out
    return edges


def _package(m: str) -> str:
    return m.split(".")[1] if "." in m else ""


def test_imports_run_downward():
    upward = [(a, b) for a, bs in import_graph().items() for b in bs
              if _package(a) != _package(b) and _package(b) and LAYER[_package(b)] >= LAYER[_package(a)]]
    assert not upward, upward
    assert set(map(_package, import_graph())) - {""} <= set(LAYER)


def test_no_import_cycles():
    edges, state, cycles = import_graph(), {}, []

    def visit(u, path):
        state[u] = 1
        for v in edges.get(u, ()):
            if state.get(v) == 1:
                cycles.append(path[path.index(v):] + [v])
            elif v not in state:
                visit(v, path + [v])
        state[u] = 2

    for u in edges:
        if u not in state:
            visit(u, [u])
    assert not cycles, cycles
