"""The package reads as layers: a module imports only modules of lower layers (docs/ARCHITECTURE.md)."""

import ast

from helpers import ROOT

# low to high; a module may import minird modules of strictly lower layers only
LAYERS = [
    {"ops", "kv_cache", "data", "cli"},
    {"model", "graphed"},
    {"generate", "checkpoint", "pretrained", "diagnose"},
    {"evaluate", "tokenizer"},
    {"train"},
    {"experiments", "bench"},
]
LAYER = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def minird_imports(path):
    """The top-level minird modules that the file at path imports (minird.x.y -> x)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("minird"):
            parts = node.module.split(".")
            names |= {parts[1]} if len(parts) > 1 else {alias.name for alias in node.names}
        elif isinstance(node, ast.Import):
            names |= {a.name.split(".")[1] for a in node.names if a.name.startswith("minird.")}
    return names - {"_C"}


def test_imports_go_down_the_layers():
    package = ROOT / "minird"
    files = [p for p in package.rglob("*.py")]
    assert files
    for path in files:
        module = path.relative_to(package).parts[0].removesuffix(".py")
        if module == "__init__":
            continue
        assert module in LAYER, f"{path}: add minird.{module} to a layer of tests/test_layout.py"
        for imported in minird_imports(path) - {module}:
            assert LAYER[imported] < LAYER[module], f"{path} imports minird.{imported}, a layer up or beside it"
