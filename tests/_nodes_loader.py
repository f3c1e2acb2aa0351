"""Load the ComfyUI-free node helpers (nodes/releases.py, nodes/lora_formats.py) by file path.

``nodes/__init__.py`` imports comfy_api, so ``import nodes.x`` needs ComfyUI; these two modules
have no package-relative imports and are loaded standalone for the unit tests.
"""
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load(name: str):
    mod_name = f"_hypersd_nodes_{name}"
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    spec = importlib.util.spec_from_file_location(mod_name, ROOT / "nodes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module
