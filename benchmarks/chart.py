"""PNG charts drawn with PIL (no matplotlib dependency)."""
from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageDraw

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (0, 0, 0), (255, 187, 120),
           (152, 223, 138), (255, 152, 150), (197, 176, 213), (196, 156, 148), (0, 0, 128), (128, 128, 0),
           (0, 128, 128), (219, 219, 141)]


def _series(rows):
    out = {}
    for r in rows:
        if r["steps"] == 25:
            continue
        out.setdefault(f"{r['model']} eta={r['eta']}", []).append(r)
    return out


def _panel(draw, box, series, key, title, ymax=None, log=False):
    import math

    x0, y0, x1, y1 = box
    draw.rectangle(box, outline=(0, 0, 0))
    draw.text((x0 + 4, y0 - 14), title, fill=(0, 0, 0))
    if log:  # plot log10(1 + v); axis labels show v
        tf = lambda v: math.log10(1 + max(v, 0))  # noqa: E731
        series = {k: [dict(r, **{key: tf(r[key])}) for r in rs] for k, rs in series.items()}
    vals = [r[key] for rs in series.values() for r in rs]
    top = ymax if ymax is not None else max(vals) * 1.1 or 1.0
    steps = [1, 2, 4, 8]
    px = lambda s: x0 + 30 + steps.index(s) * (x1 - x0 - 60) / 3  # noqa: E731
    py = lambda v: y1 - 10 - (v / top) * (y1 - y0 - 20)  # noqa: E731
    for s in steps:
        draw.text((px(s) - 3, y1 + 2), str(s), fill=(0, 0, 0))
    for frac in (0, 0.5, 1):
        label = f"{10 ** (top * frac) - 1:.0f}" if log else f"{top * frac:.2f}"
        draw.text((x0 - 40, py(top * frac) - 5), label, fill=(0, 0, 0))
    for i, rs in enumerate(series.values()):
        pts = [(px(r["steps"]), py(r[key])) for r in rs if r["steps"] in steps]
        col = PALETTE[i % len(PALETTE)]
        if len(pts) > 1:
            draw.line(pts, fill=col, width=2)
        for p in pts:
            draw.ellipse((p[0] - 3, p[1] - 3, p[0] + 3, p[1] + 3), fill=col)


def quality_chart(rows, path: Path):
    series = _series(rows)
    w, h = 900, 360 + 14 * len(series)
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    _panel(d, (50, 30, 430, 300), series, "align", "text alignment (attribute accuracy) vs steps", ymax=1.0)
    _panel(d, (500, 30, 880, 300), series, "fd", "Frechet distance (classifier features, log scale) vs steps", log=True)
    teacher25 = [r for r in rows if r["steps"] == 25]
    y = 320
    if teacher25:
        d.text((50, y), f"teacher 25 steps: align {teacher25[0]['align']:.3f}, FD {teacher25[0]['fd']:.2f}", fill=(0, 0, 0))
        y += 14
    for i, name in enumerate(series):
        d.rectangle((50, y + 3, 60, y + 11), fill=PALETTE[i % len(PALETTE)])
        d.text((66, y), name, fill=(0, 0, 0))
        y += 14
    tmp = path.with_suffix(".tmp.png")
    img.save(tmp)
    tmp.replace(path)


def sample_grid(samples: dict, path: Path, scale: int = 3):
    """One row per (model, steps, eta): the first 8 samples, upscaled."""
    keys = list(samples)
    if not keys:
        return
    n, c, hh, ww = samples[keys[0]].shape
    label_w = 260
    img = Image.new("RGB", (label_w + n * ww * scale, len(keys) * hh * scale), "white")
    d = ImageDraw.Draw(img)
    for i, k in enumerate(keys):
        d.text((4, i * hh * scale + 4), f"{k[0]} s={k[1]} eta={k[2]}", fill=(0, 0, 0))
        arr = ((samples[k].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        for j, a in enumerate(arr):
            tile = Image.fromarray(a).resize((ww * scale, hh * scale), Image.NEAREST)
            img.paste(tile, (label_w + j * ww * scale, i * hh * scale))
    tmp = path.with_suffix(".tmp.png")
    img.save(tmp)
    tmp.replace(path)
