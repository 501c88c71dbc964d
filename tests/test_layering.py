"""The package's layers, checked from the source: imports run only downward, no import cycle, no
private name (`_x`) used across modules.

Layers, bottom to top (ARCHITECTURE.md, "Where the code goes next"):
core → model → engine → quant → export → analysis → compare → workbench → the entry points
(`awqnb/__init__.py`, `__main__.py`, `api.py`, `cli.py`). A module may import from its own layer
and the ones below it; function-local imports count too (they stay only for heavy optional
libraries, never to hide an upward or circular import). Cycles are looked for among module-level
imports (what runs at import time).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "awqnb"
LAYERS = ("core", "model", "engine", "quant", "export", "analysis", "compare", "workbench")
TOP = len(LAYERS)  # the entry points


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer(mod: str) -> int:
    parts = mod.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else TOP


MODULES = {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def resolve(mod: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    """The absolute module an ImportFrom names (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(mod: str):
    """(imported awqnb module, names imported from it or None, module level?, line) for `mod`."""
    path = MODULES[mod]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = set(map(id, tree.body))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "awqnb" or a.name.startswith("awqnb."):
                    yield a.name, None, id(node) in top, node.lineno
        elif isinstance(node, ast.ImportFrom):
            src = resolve(mod, path.name == "__init__.py", node)
            if src != "awqnb" and not src.startswith("awqnb."):
                continue
            for a in node.names:
                sub = f"{src}.{a.name}"
                if sub in MODULES:  # `from awqnb.x import module`
                    yield sub, None, id(node) in top, node.lineno
                else:
                    yield src, a.name, id(node) in top, node.lineno


def graph() -> dict[str, set[str]]:
    g: dict[str, set[str]] = {m: set() for m in MODULES}
    for m in MODULES:
        for dep, _, module_level, _ in imports(m):
            if module_level and dep != m and dep in MODULES:
                g[m].add(dep)
    return g


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g[v]:
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

    for v in g:
        if v not in index:
            visit(v)
    return out


def test_every_module_is_in_a_layer():
    stray = [m for m in MODULES if layer(m) == TOP and m not in
             ("awqnb", "awqnb.__main__", "awqnb.api", "awqnb.cli")]
    assert not stray, f"modules outside the layer folders: {stray}"


def test_no_import_cycle():
    assert cycles(graph()) == []


def test_imports_only_go_down():
    bad = []
    for m in MODULES:
        for dep, _, _, line in imports(m):
            if dep in MODULES or dep.startswith("awqnb"):
                if layer(dep) > layer(m):
                    bad.append(f"{MODULES[m].relative_to(PKG.parent)}:{line} imports {dep} "
                               f"({LAYERS[layer(m)] if layer(m) < TOP else 'top'} → "
                               f"{LAYERS[layer(dep)] if layer(dep) < TOP else 'top'})")
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_no_private_name_across_modules():
    bad = []
    for m, path in MODULES.items():
        for dep, name, _, line in imports(m):
            if name and name.startswith("_") and not name.startswith("__") and dep != m:
                bad.append(f"{path.relative_to(PKG.parent)}:{line} imports {dep}.{name}")
        # `module._name` on an imported awqnb module
        tree = ast.parse(path.read_text(encoding="utf-8"))
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                src = resolve(m, path.name == "__init__.py", node)
                for a in node.names:
                    if f"{src}.{a.name}" in MODULES:
                        aliases[a.asname or a.name] = f"{src}.{a.name}"
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in aliases and node.attr.startswith("_")
                    and not node.attr.startswith("__") and aliases[node.value.id] != m):
                bad.append(f"{path.relative_to(PKG.parent)}:{node.lineno} uses "
                           f"{aliases[node.value.id]}.{node.attr}")
    assert not bad, "private names used across modules:\n" + "\n".join(sorted(set(bad)))


@pytest.mark.parametrize("mod", ["awqnb.core.config"])
def test_config_does_not_know_plans(mod):
    assert not any(dep.startswith("awqnb.quant") for dep, *_ in imports(mod))
