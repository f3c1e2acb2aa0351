"""Build every shipped Hyper-SD workflow: writes the UI files, API twins and docs tables.

    python -m workflows.build            # rewrite example_workflows/*.json, workflows/api/*.json, docs + README tables
    python -m workflows.build --check    # exit 1 if any committed file differs

The workflows are defined in ``workflows/recipes.py`` (pieces in ``blocks.py``), the table in
``docs_table.py``. UI files go to example_workflows/ (ComfyUI 0.3.64 lists and serves them in the
templates browser); the API twins (for POST /prompt) go to workflows/api/, out of the browser's list.
"""
from __future__ import annotations

import argparse
import sys

from .docs_table import DOCS, README, docs_with_table
from .graph import Graph
from .recipes import WORKFLOWS
from .wfkit import API_DIR, REPO, UI_DIR, dump, load_schemas, ui_to_api, validate_api, write_atomic


def build_all(schemas: dict) -> dict[str, tuple[dict, dict, dict]]:
    """name -> (ui, api, meta)."""
    out = {}
    for name, fn in sorted(WORKFLOWS.items()):
        g = Graph(schemas)
        meta = fn(g)
        ui = g.to_ui(extra={"hypersd": meta})
        api = ui_to_api(ui, schemas)
        problems = validate_api(api, schemas)
        if problems:
            raise ValueError(f"{name}: " + "; ".join(problems))
        out[name] = (ui, api, meta)
    return out


def expected_files(schemas: dict) -> dict:
    built = build_all(schemas)
    files = {doc: docs_with_table(built, doc) for doc in (DOCS, README)}
    for name, (ui, api, _) in built.items():
        files[UI_DIR / f"{name}.json"] = dump(ui)
        files[API_DIR / f"{name}.json"] = dump(api)
    return files, built


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only compare with the committed files")
    args = parser.parse_args(argv)
    files, built = expected_files(load_schemas())
    stale = [p for p, text in files.items() if not p.is_file() or p.read_text() != text]
    if args.check:
        for p in stale:
            print(f"stale: {p.relative_to(REPO)}")
        return 1 if stale else 0
    for p in stale:
        write_atomic(p, files[p])
    print(f"{len(built)} workflows, {len(stale)} files written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
