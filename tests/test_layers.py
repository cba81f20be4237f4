"""The house's layers (docs/ARCHITECTURE.md, "Layers"): no upward or sideways import, no circle.

Every ``import`` in workbench counts, including those inside functions (an import hidden in a function
is still a dependency, and a circle hidden that way is still a circle).
"""
import ast
import re
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "workbench"

# package -> the packages it may import (the base, ``workbench/_*.py``, is below everything).
LAYERS = {
    "base": set(),
    "groups": {"base"},
    "data": {"base"},
    "models": {"base", "groups"},
    "hooks": {"base", "models"},
    "zoo": {"base", "data", "models"},
    "symmetry": {"base", "groups", "models", "hooks"},
    "probing": {"base", "groups", "models", "hooks", "symmetry"},
    "similarity": {"base", "groups", "models", "hooks", "symmetry"},
    "stitching": {"base", "groups", "models", "hooks", "symmetry", "similarity"},
    "widgets": {"base", "groups", "data", "models", "hooks", "zoo", "symmetry", "probing", "similarity", "stitching"},
    "experiments": {"base", "groups", "data", "models", "hooks", "zoo", "symmetry", "probing", "similarity",
                    "stitching", "workbench"},
    "cli": {"base", "groups", "data", "models", "hooks", "zoo", "symmetry", "probing", "similarity", "stitching",
            "widgets", "experiments", "workbench"},
    "workbench": {"base", "groups", "data", "models", "hooks", "zoo", "symmetry", "probing", "similarity",
                  "stitching", "widgets"},  # the public face (workbench/__init__.py), mostly lazy
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """Module -> the workbench modules it imports (``from x import name`` counts as x.name if that is a module)."""
    modules = {module_name(p) for p in ROOT.rglob("*.py")}
    out = defaultdict(set)
    for path in ROOT.rglob("*.py"):
        name = module_name(path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                for alias in node.names:
                    full = f"{target}.{alias.name}"
                    out[name].add(full if full in modules else target)
            elif isinstance(node, ast.Import):
                out[name].update(a.name for a in node.names)
    return {m: {t for t in ts if t == "workbench" or t.startswith("workbench.")} for m, ts in out.items()}


def layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "workbench"
    if parts[1] == "cli":
        return "cli"
    return "base" if parts[1].startswith("_") else parts[1]


def test_every_package_has_a_layer():
    assert {layer(module_name(p)) for p in ROOT.rglob("*.py")} <= set(LAYERS)


def test_no_upward_or_sideways_import():
    bad = sorted(f"{m} imports {t}" for m, ts in imports().items() for t in ts
                 if layer(t) != layer(m) and layer(t) not in LAYERS[layer(m)])
    assert not bad, "imports against the layers:\n" + "\n".join(bad)


def test_packages_use_each_others_public_names():
    """``from ..symmetry._graph import Graph`` reaches into another package's rooms: use its ``__init__``."""
    bad = sorted(f"{m} imports {t}" for m, ts in imports().items() for t in ts
                 if layer(t) not in (layer(m), "base") and any(p.startswith("_") for p in t.split(".")[2:]))
    assert not bad, "private modules of other packages:\n" + "\n".join(bad)


def test_no_import_circle():
    graph = imports()
    state, stack, circles = {}, [], []  # depth-first search: 1 = on the stack, 2 = done

    def visit(m):
        state[m] = 1
        stack.append(m)
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                circles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not circles, "import circles:\n" + "\n".join(" -> ".join(c) for c in circles)


def test_the_architecture_document_states_this_table():
    """docs/ARCHITECTURE.md's "Layers" table says what LAYERS enforces, row by row."""
    text = (ROOT.parent / "docs" / "ARCHITECTURE.md").read_text()
    table = text.split("## Layers", 1)[1].split("\n\n")[2]
    stated = {}
    for row in table.splitlines()[2:]:
        packages, _, allowed = [c.strip() for c in row.strip("|").split(" | ")]
        if packages.startswith("base"):
            keys = ["base"]
        elif "__init__" in packages:
            keys = ["workbench"]
        else:  # `probing/`, `similarity/` or `cli.py`
            keys = re.findall(r"`(\w+)(?:/|\.py)`", packages)
        for key in keys:
            stated[key] = set() if allowed == "—" else {a.strip() for a in allowed.split(",")}
    assert stated == LAYERS
