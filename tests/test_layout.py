"""The package layout's import rules (README "Layout"), checked on the source text, no ComfyUI.

- ``nodes/__init__.py`` and the ComfyUI-free modules import without ComfyUI;
- nothing imports ``nodes`` except the root ``__init__.py`` (and tests);
- ``releases/`` imports nothing of the repo but itself; no import circles between modules;
- the trainer keeps modules under 400 lines and functions under 80 (docs/architecture.md).
"""
import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("nodes", "releases", "schedulers", "workflows", "training", "benchmarks")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set:
    """Repo modules ``path`` imports (relative imports resolved; ``..x`` from nodes/ is the pack root)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(p for p in base if p)
                mod = ".".join(p for p in (base, node.module or "") if p)
            else:
                mod = node.module
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
    return {m for m in out if m and m.split(".")[0] in PACKAGES}


def _sources():
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


@pytest.mark.parametrize("module", ["nodes", "nodes.lora.files", "nodes.lora.keys", "nodes.lora.families",
                                    "nodes.lora.matching", "nodes.lora.lycoris", "nodes.lora.presets",
                                    "nodes.sampling_kind", "nodes.scribble_math", "releases", "workflows.build"])
def test_comfyui_free_modules_import_without_comfyui(module):
    importlib.import_module(module)


def test_only_the_root_init_imports_nodes():
    offenders = {name: sorted(m for m in _imports(p) if m.split(".")[0] == "nodes")
                 for name, p in _sources().items() if not name.startswith("nodes")}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_releases_imports_only_itself():
    sources = _sources()
    used = {m.split(".")[0] for name, p in sources.items() if name.startswith("releases") for m in _imports(p)}
    assert used <= {"releases"}


def test_no_import_circles():
    sources = _sources()
    graph = {name: {m for m in _imports(p) if m in sources and m != name} for name, p in sources.items()}
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    # a package importing its own submodules (``__init__`` re-exports) is not a circle
    cycles = [c for c in cycles if not all(m.startswith(c[0] + ".") or m == c[0] for m in c)]
    assert cycles == []


def test_training_modules_and_functions_stay_short():
    """docs/architecture.md: no trainer module over 400 lines, no function over 80 (split by phase)."""
    long_modules, long_functions = [], []
    for name, path in _sources().items():
        if not name.startswith("training"):
            continue
        text = path.read_text()
        if len(text.splitlines()) > 400:
            long_modules.append(f"{name} ({len(text.splitlines())} lines)")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80:
                long_functions.append(f"{name}.{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert long_modules == [] and long_functions == []
