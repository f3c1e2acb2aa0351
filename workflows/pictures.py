"""Pictures of the shipped workflows as ComfyUI's front end draws them.

    python -m workflows.pictures --url http://127.0.0.1:8188

Needs a running ComfyUI with this pack, and node / Chromium / playwright-core as for
``workflows.node_sizes``. Opens every UI workflow with ``browser_check.cjs --shots`` and writes

- ``example_workflows/<name>.jpg``: the templates browser's thumbnail for that workflow (frontend
  1.27 asks for ``/api/workflow_templates/<pack>/<name>.jpg``): its title over the graph;
- ``docs/images/workflows/<kind>.png``: one picture per kind of workflow for the README.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from .build import build_all
from .docs_table import PICTURES_DIR, kind_slug, representatives
from .wfkit import REPO, UI_DIR, load_schemas

DOCS_IMAGES = REPO / PICTURES_DIR
THUMB = 512  # square: the templates browser shows a 256 px card, so 2x for sharp screens
README_WIDTH = 1100
BACKGROUND = (32, 32, 32)
FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf"


def shoot(url: str, out_dir: Path) -> None:
    env = dict(os.environ, NODE_PATH=os.environ.get("PLAYWRIGHT_NODE_PATH", "/work/browser-tools/node_modules"))
    files = sorted(str(p) for p in UI_DIR.glob("*.json"))
    run = subprocess.run(["node", str(REPO / "workflows" / "browser_check.cjs"), url, "--shots", str(out_dir), *files],
                         capture_output=True, text=True, env=env, timeout=900)
    if run.returncode != 0:
        raise SystemExit(f"browser_check.cjs --shots failed:\n{run.stderr[-3000:]}")


def wrap(text: str, font, width: int, draw) -> list[str]:
    lines = [""]
    for word in text.split():
        trial = f"{lines[-1]} {word}".strip()
        if draw.textlength(trial, font=font) <= width or not lines[-1]:
            lines[-1] = trial
        else:
            lines.append(word)
    return lines


def thumbnail(graph_png: Path, title: str) -> Image.Image:
    """The workflow's title (wrapped, large) over its graph, on the front end's dark background."""
    font = ImageFont.truetype(FONT, 32) if Path(FONT).is_file() else ImageFont.load_default()
    canvas = Image.new("RGB", (THUMB, THUMB), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    lines = wrap(title, font, THUMB - 40, draw)[:3]
    for i, line in enumerate(lines):
        draw.text((20, 16 + 40 * i), line, fill=(235, 235, 235), font=font)
    band = 28 + 40 * len(lines)
    with Image.open(graph_png) as graph:
        graph = graph.convert("RGB")
        graph.thumbnail((THUMB - 16, THUMB - band - 8), Image.LANCZOS)
        canvas.paste(graph, ((THUMB - graph.width) // 2, band + (THUMB - band - graph.height) // 2))
    return canvas


def readme_picture(graph_png: Path) -> Image.Image:
    with Image.open(graph_png) as graph:
        graph = graph.convert("RGB")
        if graph.width > README_WIDTH:
            graph = graph.resize((README_WIDTH, round(graph.height * README_WIDTH / graph.width)), Image.LANCZOS)
        return graph.quantize(colors=256, method=Image.Quantize.FASTOCTREE)  # ~3x smaller, links keep their colours


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True, help="a running ComfyUI with this pack")
    args = parser.parse_args(argv)
    built = build_all(load_schemas())
    DOCS_IMAGES.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        shoot(args.url.rstrip("/") + "/", Path(tmp))
        for name, (_, _, meta) in built.items():
            title = f"{meta['family']}: {meta['kind']}, {meta['steps']} step{'' if meta['steps'] == 1 else 's'}"
            thumbnail(Path(tmp) / f"{name}.png", title).save(UI_DIR / f"{name}.jpg", quality=82, optimize=True)
        for kind, name in representatives(built).items():
            readme_picture(Path(tmp) / f"{name}.png").save(DOCS_IMAGES / f"{kind_slug(kind)}.png", optimize=True)
    print(f"{len(built)} thumbnails in {UI_DIR}, {len(representatives(built))} pictures in {DOCS_IMAGES}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
