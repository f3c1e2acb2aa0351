"""Where each node of a shipped workflow sits, from the sizes ComfyUI's front end gives its nodes.

``schemas/node_sizes.json`` holds, per node type, the smallest size the front end (ComfyUI 0.3.64,
frontend 1.27) lets that node have: ``node.computeSize()`` after the node is created, measured in
headless Chromium by ``python -m workflows.node_sizes`` (the browser test checks it is current). A
node opened with a smaller saved size is enlarged by the front end and then covers its neighbours,
which is what happened before this module.

Nodes go in columns by their depth in the graph, each pulled right next to its first consumer; each
column is as wide as its widest node; nodes stack with their title bars (LiteGraph.NODE_TITLE_HEIGHT)
and a gap counted in, so no two node boxes overlap. Notes go above.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

SIZES_FILE = Path(__file__).resolve().parent / "schemas" / "node_sizes.json"
TITLE_H = 30  # LiteGraph.NODE_TITLE_HEIGHT: drawn above node.pos, not part of node.size
GAP_X, GAP_Y = 70, 36  # room for links between columns and for the node-source badge above titles
WIDTH = 320  # every node at least this wide, so combo values (file names) stay readable
# Larger than the front end's minimum where the content needs room to be usable
ROOMY = {"CLIPTextEncode": (400, 170), "LoadImage": (320, 380), "SaveImage": (360, 380), "PreviewAny": (400, 200)}
NOTE_W, NOTE_CHARS_PER_LINE, NOTE_LINE_H = 640, 88, 16
# A one-line widget shows "label  value" in the front end's 12 px font: ~7 px a character plus arrows and
# margins (a 40-character checkpoint name + label needs ~340 px, where 320 truncated the label).
CHAR_W, WIDGET_PAD = 7, 64


def measured_sizes() -> dict:
    return json.loads(SIZES_FILE.read_text())


def node_size(node_type: str, sizes: dict, one_line_widgets=()) -> tuple[int, int]:
    """The front end's minimum, made roomier; wide enough for each one-line widget's label and value."""
    if node_type not in sizes:
        raise KeyError(f"workflows/schemas/node_sizes.json has no size for {node_type!r}: measure it in the "
                       "front end with `python -m workflows.node_sizes --url http://127.0.0.1:8188` (ComfyUI running)")
    w, h = sizes[node_type]
    roomy_w, roomy_h = ROOMY.get(node_type, (WIDTH, 0))
    text_w = max((WIDGET_PAD + CHAR_W * (len(name) + len(str(value))) for name, value in one_line_widgets), default=0)
    return max(math.ceil(w), roomy_w, text_w), max(math.ceil(h), roomy_h)


def note_size(text: str) -> tuple[int, int]:
    """A Note tall enough that its text shows without scrolling (long lines wrap)."""
    lines = sum(max(1, math.ceil(len(line) / NOTE_CHARS_PER_LINE)) for line in text.split("\n"))
    return NOTE_W, 24 + NOTE_LINE_H * lines


def columns(node_ids: list, links: dict) -> dict:
    """node id -> column. ``links``: node id -> ids of the nodes it takes inputs from (insertion order)."""
    col = {}
    for n in node_ids:  # nodes are added after their inputs: longest path from a source
        col[n] = 1 + max((col[s] for s in links.get(n, ())), default=-1)
    consumers = {n: [m for m in node_ids if n in links.get(m, ())] for n in node_ids}
    for n in reversed(node_ids):  # then as far right as its consumers allow: next to what it feeds
        if consumers[n]:
            col[n] = min(col[m] for m in consumers[n]) - 1
    return col


def place(node_ids: list, links: dict, size_of: dict, notes: list) -> dict:
    """node id -> (pos, size) for graph nodes in columns and ``notes`` ([(id, size)]) in a row above.

    Within a column nodes keep the order they were added in; a node whose first input comes from the
    column just left of it moves down level with that input when there is room, so a chain (sampler ->
    decode -> stitch) reads as a row."""
    col = columns(node_ids, links)
    orders = {c: [n for n in node_ids if col[n] == c] for c in sorted(set(col.values()))}
    x, placed = 0, {}
    for c, order in orders.items():
        y = TITLE_H
        for n in order:
            first = (links.get(n) or [None])[0]
            if first is not None and col[first] == c - 1:
                y = max(y, placed[first][0][1])
            placed[n] = ([x, y], list(size_of[n]))
            y += size_of[n][1] + TITLE_H + GAP_Y
        x += max(size_of[n][0] for n in order) + GAP_X
    x = 0
    for note_id, (w, h) in notes:
        placed[note_id] = ([x, -h - GAP_Y], [w, h])
        x += w + GAP_X
    return placed
