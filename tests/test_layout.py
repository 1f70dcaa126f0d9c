"""The package's shape: methods reach cilbench only through the kit; imports flow down the layers of a run
(no circles, no imports from a lower layer to a higher one)."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "cilbench"

# lowest first: a module may import its own layer and the layers below it
LAYERS = ["cilbench.errors", "cilbench.provenance", "cilbench.safeio", "cilbench.config", "cilbench.data",
          "cilbench.train", "cilbench.kit", "cilbench.run", "cilbench.report", "cilbench.sweep", "cilbench.bench",
          "cilbench.cli"]


def imported_modules(path: Path, module: str) -> set[str]:
    """Every cilbench module `path` imports, at the top or inside a function, resolved to a module name."""
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}       # `from pkg import module`
    return {m for m in found if m.startswith("cilbench")}


def package_modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def layer(module: str) -> int:
    ranks = [i for i, prefix in enumerate(LAYERS) if module == prefix or module.startswith(prefix + ".")]
    return ranks[-1] if ranks else -1


def test_methods_import_only_the_kit():
    for path in sorted((REPO / "methods").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                if name.startswith("cilbench"):
                    assert name == "cilbench.kit" or name.startswith("cilbench.kit."), \
                        f"{path.name} imports {name}: methods use only cilbench.kit"


def test_imports_flow_down_the_layers_without_circles():
    modules = package_modules()
    graph = {}
    for module, path in modules.items():
        targets = {t for t in imported_modules(path, module) if t in modules and t != module}
        graph[module] = targets
        if module.startswith("cilbench.kit.registry"):
            targets.discard("cilbench.methods")      # the registry loads the plug-ins; they sit above it
        for target in targets:
            if target == "cilbench" or target.startswith("cilbench.methods"):
                continue
            assert layer(target) <= layer(module), f"{module} imports {target} from a higher layer"
    # no circles between modules (a package's __init__ re-exporting its own modules is not a circle)
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in graph.get(node, ()):
            if nxt.startswith("cilbench.methods") or nxt == "cilbench" or node.startswith(nxt + "."):
                continue
            if state.get(nxt) == 1:
                raise AssertionError("import circle: " + " -> ".join(trail[trail.index(nxt):] + [nxt]))
            if not state.get(nxt):
                visit(nxt, trail + [nxt])
        state[node] = 2

    for module in graph:
        if not state.get(module):
            visit(module, [module])


def test_the_harness_never_imports_a_method():
    """Methods are plug-ins found through the registry; no harness module imports one by name."""
    for module, path in package_modules().items():
        if module == "cilbench.kit.registry":
            continue
        imported = imported_modules(path, module)
        assert not any(m.startswith("cilbench.methods") for m in imported), f"{module} imports a method"
