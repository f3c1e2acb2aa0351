"""Fixtures for tests that run a real ComfyUI (0.3.64) with this pack installed.

The whole directory is skipped unless COMFYUI_PATH points at a ComfyUI checkout. The server runs
in ComfyUI's own interpreter, found in this order:
  1. $COMFYUI_PYTHON
  2. $COMFYUI_PATH/../comfy-venv/bin/python  (the layout tests/comfyui/setup_comfyui.sh creates)
  3. `python` on PATH
Set-up steps: docs/comfyui-testing.md.

Fixtures (all session-scoped, so ComfyUI starts once per pytest run):
  comfyui_path -> Path, comfyui_python -> str
  comfy_server -> harness.ComfyServer with the repo linked as custom_nodes/comfyui-hyper-sd
  tiny_models  -> tiny_checkpoints.TinyModels (lazy, seeded, cached builders of tiny model files)
Use relative imports in this directory: `from .harness import ...`, `from . import tiny_checkpoints`.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from .harness import ComfyServer
from .tiny_checkpoints import TinyModels

REPO_ROOT = Path(__file__).resolve().parents[2]
SKIP_REASON = ("COMFYUI_PATH is not set: these tests need a real ComfyUI 0.3.64 checkout "
               "(see docs/comfyui-testing.md)")


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.comfyui)
            if not os.environ.get("COMFYUI_PATH"):
                item.add_marker(pytest.mark.skip(reason=SKIP_REASON))


def find_comfyui_python(comfyui_path: Path) -> str:
    explicit = os.environ.get("COMFYUI_PYTHON")
    if explicit:
        return explicit
    sibling_venv = comfyui_path.resolve().parent / "comfy-venv" / "bin" / "python"
    if sibling_venv.exists():
        return str(sibling_venv)
    return shutil.which("python") or "python"


@pytest.fixture(scope="session")
def comfyui_path() -> Path:
    value = os.environ.get("COMFYUI_PATH")
    if not value:
        pytest.skip(SKIP_REASON)
    path = Path(value)
    if not (path / "main.py").is_file():
        pytest.fail(f"COMFYUI_PATH={value} has no main.py; expected a ComfyUI checkout")
    return path


@pytest.fixture(scope="session")
def comfyui_python(comfyui_path) -> str:
    return find_comfyui_python(comfyui_path)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> TinyModels:
    cache = os.environ.get("HYPERSD_TINY_MODEL_CACHE")
    root = Path(cache) if cache else tmp_path_factory.mktemp("tiny_models")
    return TinyModels(root)


@pytest.fixture(scope="session")
def comfy_server(comfyui_path, comfyui_python, tmp_path_factory):
    """One ComfyUI for the session, the repo installed as a custom node. Stopped at session end."""
    base_dir = tmp_path_factory.mktemp("comfy_base")
    server = ComfyServer(comfyui_path, comfyui_python, base_dir, pack_dir=REPO_ROOT)
    server.start()
    try:
        yield server
    finally:
        server.stop()
