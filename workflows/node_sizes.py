"""Measure, in ComfyUI's own front end, the smallest size of every node type the workflows use.

    python -m workflows.node_sizes --url http://127.0.0.1:8188 [--check]

Needs a running ComfyUI with this pack, node, Chromium (CHROMIUM, default /usr/bin/chromium) and
playwright-core (PLAYWRIGHT_NODE_PATH, default /work/browser-tools/node_modules). Writes
workflows/schemas/node_sizes.json, which ``layout`` lays the workflows out with.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from .graph import Graph
from .layout import SIZES_FILE
from .recipes import WORKFLOWS
from .wfkit import REPO, dump, load_schemas, write_or_check


def used_node_types(schemas: dict) -> list[str]:
    types = {"Note"}
    for fn in WORKFLOWS.values():
        g = Graph(schemas)
        fn(g)
        types.update(n.type for n in g.nodes)
    return sorted(types)


def measure_in_browser(url: str, types: list[str]) -> dict:
    env = dict(os.environ, NODE_PATH=os.environ.get("PLAYWRIGHT_NODE_PATH", "/work/browser-tools/node_modules"))
    out = subprocess.run(["node", str(REPO / "workflows" / "browser_check.cjs"), url, "--measure", *types],
                         capture_output=True, text=True, env=env, timeout=300)
    if out.returncode != 0:
        raise SystemExit(f"browser_check.cjs --measure failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True, help="a running ComfyUI with this pack")
    parser.add_argument("--check", action="store_true", help="only compare with the committed file")
    args = parser.parse_args(argv)
    text = dump(dict(sorted(measure_in_browser(args.url.rstrip("/") + "/", used_node_types(load_schemas())).items())))
    return write_or_check(SIZES_FILE, text, args.check)


if __name__ == "__main__":
    sys.exit(main())
