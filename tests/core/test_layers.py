"""The package's layers import one way: each module only from its own layer or the ones below,
with no import cycle (imports inside functions count too)."""

import ast
from pathlib import Path

import rainfusion

PACKAGE = Path(rainfusion.__file__).parent
# bottom first; a module's layer is that of the longest prefix of its name listed here
LAYERS = [
    ("_logging", "_validation"),                                   # no rainfusion imports
    ("layout", "config", "mask"),                                  # what the method is about
    ("permutation", "head_patterns", "arm", "predictor", "compensation"),  # the algorithms, plain torch
    ("kernels", "portable", "reference"),                          # implementations, oracles
    ("backends",),                                                 # the one importer of kernels
    ("methods", "steps"),                                          # per-method plans, state
    ("attention",),                                                # the entry points
    ("integrations",),                                             # diffusers
    ("tools", ""),                                                 # CLI, benchmarks, demo; the package
]


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(name: str) -> set[str]:
    """The rainfusion modules that module ``name`` imports (relative to the package)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".") if package else []
                base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.split(".")[0] == "rainfusion":
                target = node.module.removeprefix("rainfusion").lstrip(".")
            else:
                continue
            for alias in node.names:  # `from .kernels import block_sparse` imports a module
                sub = f"{target}.{alias.name}" if target else alias.name
                found.add(sub if sub in MODULES else target)
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("rainfusion").lstrip(".") for a in node.names
                      if a.name.split(".")[0] == "rainfusion"}
    return found - {name}


GRAPH = {name: _imports(name) for name in MODULES}


def _layer(name: str) -> int:
    matches = [(len(prefix), i) for i, layer in enumerate(LAYERS) for prefix in layer
               if name == prefix or name.startswith(prefix + ".") or prefix == ""]
    return max(matches)[1]


def test_every_module_is_placed_and_imports_only_its_layer_or_below():
    upward = [f"{name} (layer {_layer(name)}) imports {target} (layer {_layer(target)})"
              for name, targets in GRAPH.items() for target in targets if _layer(target) > _layer(name)]
    assert not upward, "\n".join(upward)
    assert {"attention", "backends", "methods", "kernels.block_sparse", "tools.cli"} <= set(GRAPH)


def test_no_import_cycles():
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(name: str) -> None:
        state[name] = "open"
        stack.append(name)
        for target in sorted(GRAPH[name]):
            assert state.get(target) != "open", "import cycle: " + " -> ".join(stack[stack.index(target):] + [target])
            if target not in state:
                visit(target)
        stack.pop()
        state[name] = "done"

    for name in sorted(GRAPH):
        if name not in state:
            visit(name)


def test_only_backends_reaches_the_kernels_and_nothing_in_the_attention_path_the_oracle():
    kernel_users = {name for name, targets in GRAPH.items() if any(t.startswith("kernels") for t in targets)}
    assert {name for name in kernel_users if not name.startswith("kernels")} == {"backends"}
    oracle_users = {name for name, targets in GRAPH.items() if "reference" in targets}
    assert all(name.startswith("tools") for name in oracle_users), oracle_users


def test_the_layer_check_sees_an_upward_import():
    """The walk finds imports inside functions, relative or absolute."""
    assert "kernels.gather_rows" in GRAPH["backends"]  # a function-level `from .kernels.gather_rows import`
    assert "tools.generate" in GRAPH["tools.cli"]
    assert _layer("kernels._block_means") == 3 and _layer("tools.demo.run") == 8 and _layer("") == 8
