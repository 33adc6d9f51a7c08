"""The package's import graph: one layering, imports only downward, no private name crossing a module.

LAYERS lists slc's modules bottom up. Every `from .x import ...` / `from slc.x import ...` inside
slc must name a module listed before the importing one (so no cycle can exist), function-local
imports of slc modules are not allowed (they were how cycles hid), and no file in slc/, tests/ or
bench/ imports a leading-underscore name from another module.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "slc"

LAYERS = [
    "errors", "rans", "tiles", "trellis", "fused", "kernels", "symbols", "quant", "rotation", "lossless", "tensor",
    "gptq", "ecsq", "hf", "factors", "nn", "models", "texts", "sources", "synthetic", "calibrate", "lagrange",
    "lowrank", "allocate", "compress", "importance", "distill", "recipe", "integrity", "checkpoint", "streaming",
    "blockwise", "metrics", "memory", "gguf_peers", "llamacpp", "viz", "demo", "render", "cli", "__main__", "__init__",
]


def _modules() -> dict[str, ast.Module]:
    return {p.stem: ast.parse(p.read_text(), str(p)) for p in sorted(PKG.glob("*.py"))}


def _slc_imports(tree: ast.Module):
    """(imported slc module, names, is module level, line) for every import of an slc module."""
    top = set(map(id, tree.body))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                mods = [node.module] if node.module else [a.name for a in node.names]
            elif node.level == 0 and node.module and (node.module == "slc" or node.module.startswith("slc.")):
                rest = node.module.removeprefix("slc").lstrip(".")
                mods = [rest] if rest else [a.name for a in node.names]
            else:
                continue
            for m in mods:
                yield m.split(".")[0], [a.name for a in node.names], id(node) in top, node.lineno
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("slc."):
                    yield a.name.split(".")[1], [], id(node) in top, node.lineno


def test_every_module_has_a_place_in_the_layering():
    missing = sorted(set(_modules()) - set(LAYERS))
    assert not missing, f"add {missing} to LAYERS in tests/test_layering.py (bottom up: what may it import?)"


def test_imports_point_only_downward():
    rank = {m: i for i, m in enumerate(LAYERS)}
    bad = []
    for mod, tree in _modules().items():
        for dep, _, _, line in _slc_imports(tree):
            if dep in rank and mod in rank and mod != "__init__" and rank[dep] >= rank[mod]:
                bad.append(f"slc/{mod}.py:{line} imports slc.{dep} (not below it)")
    assert not bad, "\n".join(bad)


def test_no_import_cycle():
    graph = {mod: {d for d, _, _, _ in _slc_imports(tree) if d != mod} for mod, tree in _modules().items()}
    graph.pop("__init__", None)
    state: dict[str, int] = {}

    def visit(m, path):
        if state.get(m) == 1:
            pytest.fail("import cycle: " + " -> ".join(path[path.index(m):] + [m]))
        if state.get(m) == 2 or m not in graph:
            return
        state[m] = 1
        for d in sorted(graph[m]):
            visit(d, path + [m])
        state[m] = 2

    for m in sorted(graph):
        visit(m, [])


def test_no_function_local_import_of_slc_modules():
    bad = [f"slc/{mod}.py:{line} imports slc.{dep} inside a function"
           for mod, tree in _modules().items() for dep, _, top, line in _slc_imports(tree) if not top]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("folder", ["slc", "tests", "bench", "scripts"])
def test_no_private_name_imported_across_modules(folder):
    bad = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("slc")):
                for a in node.names:
                    if a.name.startswith("_") and a.name != "__version__":
                        bad.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {a.name}")
    assert not bad, "\n".join(bad)
