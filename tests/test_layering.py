"""The package's structure, checked from its source: layers, no import cycles, no private imports.

Every ``import`` and ``from ... import`` statement is read with :mod:`ast`, function-local ones included,
so a cycle closed by a late import is still a cycle here.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Lower number = lower layer. A module may import its own layer or lower ones, never a higher one.
LAYERS = {
    "rebasin._errors": 0,
    "rebasin._common": 1,
    "rebasin._deprecation": 1,
    "rebasin._distributed": 1,
    "rebasin.spec": 2,
    # public helpers shared by the applications and continual (plain data, reference nets, argument checks)
    "rebasin.datasets": 2,
    "rebasin.nets": 2,
    "rebasin.checks": 2,
    "rebasin.trace": 3,
    "rebasin.matching": 4,
    "rebasin.paths": 5,
    "rebasin.merging": 6,
    "rebasin.landscape": 6,
    "rebasin.apps": 7,
    "rebasin.__main__": 7,
    # deprecated aliases of rebasin.apps.* (one release)
    "rebasin.models": 8,
    "rebasin.data": 8,
    "rebasin.train": 8,
    "rebasin": 9,
    "continual": 10,
}


def _modules() -> dict[str, Path]:
    out = {}
    for top in ("rebasin", "continual"):
        for path in (ROOT / top).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _layer(module: str) -> int:
    best = max((k for k in LAYERS if module == k or module.startswith(k + ".")), key=len)
    return LAYERS[best]


def _imports(module: str, path: Path) -> list[tuple[str, str | None, int]]:
    """(imported module, imported name or None, line) for every import statement in the file."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if sub in MODULES:
                    found.append((sub, None, node.lineno))
                else:
                    found.append((target, alias.name, node.lineno))
        elif isinstance(node, ast.Import):
            found.extend((alias.name, None, node.lineno) for alias in node.names)
    return [(t, n, line) for t, n, line in found if t.split(".")[0] in ("rebasin", "continual")]


def _edges() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {m: set() for m in MODULES}
    for module, path in MODULES.items():
        for target, _, _ in _imports(module, path):
            if target in MODULES and target != module:
                edges[module].add(target)
    return edges


def _package_of(module: str) -> str:
    return module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]


def test_every_import_goes_to_the_same_or_a_lower_layer():
    bad = []
    for module, path in MODULES.items():
        for target, _, line in _imports(module, path):
            if _layer(target) > _layer(module):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {target} (layer {_layer(target)} > {_layer(module)})")
    assert not bad, "\n".join(bad)


def test_no_import_cycles_between_modules():
    # A package's __init__ re-exports its submodules; the edge from a submodule back to its own package
    # __init__ would be a cycle by construction, so imports of a package's own __init__ from inside it
    # are errors of their own (checked here too).
    edges = _edges()
    inward = [
        f"{m} imports its own package {t}"
        for m, ts in edges.items()
        for t in ts
        if MODULES[t].name == "__init__.py" and m.startswith(t + ".")
    ]
    assert not inward, "\n".join(inward)

    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_no_module_takes_another_modules_private_names():
    """Private names stay in their module; shared helpers live in modules made for sharing."""
    bad = []
    for module, path in MODULES.items():
        for target, name, line in _imports(module, path):
            if name is not None and name.startswith("_") and not name.startswith("__") and target != module:
                bad.append(f"{path.relative_to(ROOT)}:{line} takes {name} from {target}")
            # a private module may be shared inside its own top-level package only
            private_module = any(part.startswith("_") and not part.startswith("__") for part in target.split("."))
            if private_module and target.split(".")[0] != module.split(".")[0]:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports the private module {target}")
    assert not bad, "\n".join(bad)


def test_continual_uses_public_rebasin_only():
    """continual is built on the library's public surface: no application layer, no private module or name."""
    bad = []
    for module, path in MODULES.items():
        if not module.startswith("continual"):
            continue
        for target, name, line in _imports(module, path):
            if not target.startswith("rebasin"):
                continue
            if target == "rebasin.apps" or target.startswith("rebasin.apps."):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports the application layer {target}")
            private_module = any(part.startswith("_") and not part.startswith("__") for part in target.split("."))
            if private_module or (name is not None and name.startswith("_") and not name.startswith("__")):
                bad.append(f"{path.relative_to(ROOT)}:{line} takes a private name: {target}{'.' + name if name else ''}")
    assert not bad, "\n".join(bad)


def test_no_public_function_shadows_its_own_module():
    """``rebasin.X`` is never a function standing where the module ``rebasin/X.py`` would be."""
    import importlib

    bad = []
    for module in MODULES:
        if not module.startswith("rebasin") or module.count(".") == 0:
            continue
        package, _, leaf = module.rpartition(".")
        pkg = importlib.import_module(package)
        value = getattr(pkg, leaf, None)
        if value is not None and not isinstance(value, type(sys)):
            bad.append(f"{package}.{leaf} is a {type(value).__name__}, shadowing the module {module}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize(
    ("statement", "absent"),
    [
        ("import rebasin", ("rebasin.apps", "continual", "avalanche", "matplotlib", "transformers")),
        ("import rebasin.apps.cli", ("continual", "avalanche")),
    ],
)
def test_imports_stay_light(statement, absent):
    code = f"import sys; {statement}; print(sorted(m for m in {absent!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]", f"{statement} imported {out.stdout.strip()}"
