"""PNG charts drawn with PIL (no matplotlib dependency): one chart per claim (mean over seeds with +-1 sd
error bars against steps) and the sample grid."""
from __future__ import annotations

import math
from pathlib import Path

import torch
from PIL import Image, ImageDraw

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (0, 0, 0)]
STEPS = [1, 2, 4, 8]
BLACK = (0, 0, 0)


def save_png(img: Image.Image, path: Path):
    tmp = path.with_suffix(".tmp.png")
    img.save(tmp)
    tmp.replace(path)


def _axes(draw, box, title, top, log):
    x0, y0, x1, y1 = box
    draw.rectangle(box, outline=BLACK)
    draw.text((x0 + 4, y0 - 14), title, fill=BLACK)
    px = lambda s: x0 + 30 + STEPS.index(s) * (x1 - x0 - 60) / 3  # noqa: E731
    py = lambda v: y1 - 10 - (v / top) * (y1 - y0 - 20)  # noqa: E731
    for s in STEPS:
        draw.text((px(s) - 3, y1 + 2), str(s), fill=BLACK)
    draw.text(((x0 + x1) / 2 - 15, y1 + 14), "steps", fill=BLACK)
    # log axis: ticks at 0 and the powers of ten, so a reader can read values off it (log10(1 + v))
    ticks = [math.log10(1 + 10 ** k) for k in range(1, int(top) + 1) if math.log10(1 + 10 ** k) <= top] if log else []
    for v in ([0.0] + ticks) if log else (0, top / 2, top):
        label = f"{10 ** v - 1:.0f}" if log else f"{v:.2f}"
        draw.text((x0 - 44, py(v) - 5), label, fill=BLACK)
        draw.line((x0, py(v), x0 + 4, py(v)), fill=BLACK)
    return px, py


def panel(draw, box, title, series: dict, ymax=None, log=False):
    """series: name -> {steps: (mean, sd)}; lines through the means, +-1 sd bars (log: log10(1 + v) axis)."""
    tf = (lambda v: math.log10(1 + max(v, 0))) if log else (lambda v: v)
    pts = {n: {s: (tf(m), tf(m + sd) - tf(m), tf(m) - tf(max(m - sd, 0))) for s, (m, sd) in d.items()}
           for n, d in series.items()}
    highs = [m + up for d in pts.values() for m, up, _ in d.values()] or [1.0]
    top = ymax if ymax is not None else max(highs) * 1.1 or 1.0
    px, py = _axes(draw, box, title, top, log)
    for i, d in enumerate(pts.values()):
        col = PALETTE[i % len(PALETTE)]
        xy = [(px(s) + 2 * i, py(m)) for s, (m, _, _) in sorted(d.items()) if s in STEPS]
        if len(xy) > 1:
            draw.line(xy, fill=col, width=2)
        for (x, y), (m, up, down) in zip(xy, [v for s, v in sorted(d.items()) if s in STEPS]):
            draw.line((x, py(m + up), x, py(m - down)), fill=col, width=1)
            draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=col)


def claim_chart(path: Path, title: str, panels: list[dict], note: str = ""):
    """panels: [{title, series, ymax?, log?}] side by side; a legend of the first panel's series below."""
    names = list(panels[0]["series"])
    w, h = 60 + 450 * len(panels), 380 + 14 * len(names) + (14 if note else 0)
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    d.text((10, 6), title, fill=BLACK)
    for i, p in enumerate(panels):
        panel(d, (60 + 450 * i, 44, 440 + 450 * i, 320), p["title"], p["series"], p.get("ymax"), p.get("log", False))
    y = 348
    for i, name in enumerate(names):
        d.rectangle((60, y + 3, 70, y + 11), fill=PALETTE[i % len(PALETTE)])
        d.text((76, y), name, fill=BLACK)
        y += 14
    if note:
        d.text((60, y), note, fill=BLACK)
    save_png(img, path)


def sample_grid(samples: dict, path: Path, scale: int = 3):
    """One row per (model, steps, eta): the first 8 samples, upscaled."""
    keys = list(samples)
    if not keys:
        return
    n, c, hh, ww = samples[keys[0]].shape
    label_w = 330
    img = Image.new("RGB", (label_w + n * ww * scale, len(keys) * hh * scale), "white")
    d = ImageDraw.Draw(img)
    for i, k in enumerate(keys):
        d.text((4, i * hh * scale + 4), f"{k[0]}, {k[1]} steps, eta {k[2]}", fill=BLACK)
        arr = ((samples[k].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        for j, a in enumerate(arr):
            tile = Image.fromarray(a).resize((ww * scale, hh * scale), Image.NEAREST)
            img.paste(tile, (label_w + j * ww * scale, i * hh * scale))
    save_png(img, path)
