"""Regenerate workflows/schemas/pack_object_info.json: this pack's /object_info entries, made by ComfyUI.

    COMFYUI_PATH=/work/ComfyUI /work/comfy-venv/bin/python -m workflows.pack_schema [--check]

Imports the pack the way ComfyUI does (comfy_entrypoint -> get_node_list) and asks each V3 node
for the same dict the /object_info route returns. Model-file choices (whatever happens to be in
the local models folders) are dropped so the file is the same on every machine.
"""
from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import sys

from .wfkit import MODEL_EXTENSIONS, MODEL_FILE_INPUTS, PACK_SCHEMA, REPO, dump, write_or_check


def _strip_local_files(info: dict) -> dict:
    for section in info["input"].values():
        for name, spec in section.items():
            if name not in MODEL_FILE_INPUTS:
                continue
            if isinstance(spec[0], list):
                spec[0] = [c for c in spec[0] if not str(c).lower().endswith(MODEL_EXTENSIONS)]
            elif len(spec) > 1 and "options" in spec[1]:
                spec[1]["options"] = [c for c in spec[1]["options"] if not str(c).lower().endswith(MODEL_EXTENSIONS)]
    info["python_module"] = "custom_nodes.hypersd"
    return info


def pack_object_info(comfyui_path: str) -> dict:
    sys.argv = [sys.argv[0], "--cpu"]  # comfy.cli_args parses argv at import; no CUDA here
    sys.path.insert(0, comfyui_path)
    import comfy.options

    comfy.options.enable_args_parsing()
    spec = importlib.util.spec_from_file_location("hypersd_pack", REPO / "__init__.py",
                                                  submodule_search_locations=[str(REPO)])
    pack = importlib.util.module_from_spec(spec)
    sys.modules["hypersd_pack"] = pack
    spec.loader.exec_module(pack)
    extension = asyncio.run(pack.comfy_entrypoint())
    nodes = asyncio.run(extension.get_node_list())
    # JSON round trip: the same types (lists, not tuples) the HTTP route would give
    return {n.GET_SCHEMA().node_id: _strip_local_files(json.loads(json.dumps(n.GET_NODE_INFO_V1())))
            for n in nodes}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    path = os.environ.get("COMFYUI_PATH")
    if not path:
        raise SystemExit("set COMFYUI_PATH to a ComfyUI checkout")
    text = dump(dict(sorted(pack_object_info(path).items())))
    return write_or_check(PACK_SCHEMA, text, args.check)


if __name__ == "__main__":
    sys.exit(main())
