"""Where samples come from: image folders with .txt captions, JSONL manifests, generated shapes.

Every source yields `Record`s; `scan_records` opens each image once (fully decoding it, so
truncated files are caught) and reports unreadable ones by name instead of skipping silently.
"""
from __future__ import annotations

import json
import os
import random
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Optional

from PIL import Image, ImageDraw, ImageOps

from training.errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass
class Record:
    """One sample before preprocessing. `source_id` identifies the pixels (cache key input)."""
    caption: str
    path: Optional[str] = None                  # file on disk, or None for generated images
    render: Optional[Callable[[], Image.Image]] = None
    size: tuple[int, int] = (0, 0)              # (height, width), filled by scan_records
    source_id: str = ""

    def load(self) -> Image.Image:
        if self.render is not None:
            return self.render()
        with Image.open(self.path) as img:
            return ImageOps.exif_transpose(img).convert("RGB")


@dataclass
class ScanStats:
    num_found: int = 0
    num_ok: int = 0
    num_unreadable: int = 0
    unreadable: list = field(default_factory=list)      # [(path, reason)]
    num_missing_captions: int = 0

    def as_dict(self) -> dict:
        return {"num_found": self.num_found, "num_ok": self.num_ok,
                "num_unreadable": self.num_unreadable,
                "unreadable_files": [p for p, _ in self.unreadable],
                "num_missing_captions": self.num_missing_captions}


def _require_dir(path, key: str) -> Path:
    if path is None or str(path) == "":
        raise DataError(f"{key} is not set: expected a folder of images with .txt captions")
    p = Path(path)
    if not p.exists():
        raise DataError(f"{key} = {str(path)!r} does not exist: expected a folder of images")
    if not p.is_dir():
        raise DataError(f"{key} = {str(path)!r} is not a folder: expected a folder of images")
    return p


def read_utf8(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{what} file {path}: not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8") from None


def folder_records(path, recursive: bool = False, missing_caption: str = "error",
                   key: str = "data.path") -> tuple[list[Record], int]:
    """Images in `path` with same-name `.txt` captions. Returns (records, num_missing_captions).

    missing_caption: "error" (default) raises listing the files, "empty" uses caption "".
    """
    if missing_caption not in ("error", "empty"):
        raise DataError(f"data.missing_caption = {missing_caption!r}: expected 'error' or 'empty'")
    root = _require_dir(path, key)
    pattern = "**/*" if recursive else "*"
    files = sorted(p for p in root.glob(pattern)
                   if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise DataError(f"{key} = {str(path)!r} contains no images "
                        f"({', '.join(IMAGE_EXTENSIONS)}; recursive={recursive})")
    records, missing = [], []
    for f in files:
        txt = f.with_suffix(".txt")
        if txt.is_file():
            caption = read_utf8(txt, "caption").strip()
        else:
            missing.append(str(f))
            caption = ""
        records.append(Record(caption=caption, path=str(f)))
    if missing and missing_caption == "error":
        shown = "\n  ".join(missing[:20]) + ("\n  ..." if len(missing) > 20 else "")
        raise DataError(f"{len(missing)} image(s) in {key} = {str(path)!r} have no same-name .txt "
                        f"caption (set data.missing_caption = 'empty' to allow):\n  {shown}")
    return records, len(missing)


def jsonl_records(manifest, key: str = "data.path") -> list[Record]:
    """Lines of `{"image": path, "caption": str}`; relative paths resolve against the manifest's
    folder and may not escape it (absolute paths are taken as given)."""
    if manifest is None or str(manifest) == "":
        raise DataError(f"{key} is not set: expected a JSONL manifest file")
    mpath = Path(manifest)
    if not mpath.is_file():
        raise DataError(f"{key} = {str(manifest)!r} is not a file: expected a JSONL manifest")
    base = mpath.parent.resolve()
    records, bad = [], []
    for lineno, line in enumerate(read_utf8(mpath, f"manifest {key}").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(_manifest_entry(line, base))
        except (ValueError, TypeError) as e:
            bad.append(f"line {lineno}: {e}")
    if bad:
        raise DataError(f"{len(bad)} bad line(s) in manifest {key} = {str(manifest)!r}:\n  "
                        + "\n  ".join(bad[:20]))
    if not records:
        raise DataError(f"{key} = {str(manifest)!r} has no entries: expected JSONL lines "
                        '{"image": path, "caption": text}')
    return records


def _manifest_entry(line: str, base: Path) -> Record:
    try:
        entry = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"not JSON ({e.msg})") from None
    if not isinstance(entry, dict):
        raise ValueError("expected a JSON object")
    image, caption = entry.get("image"), entry.get("caption")
    if not isinstance(image, str) or not image:
        raise ValueError('"image" must be a non-empty string')
    if not isinstance(caption, str):
        raise ValueError('"caption" must be a string')
    p = Path(image)
    if not p.is_absolute():
        p = (base / p).resolve()
        if base != p and base not in p.parents:     # path safety: no ../ escapes
            raise ValueError(f"image path {image!r} escapes the manifest folder")
    return Record(caption=caption, path=str(p))


def scan_records(records: list[Record]) -> tuple[list[Record], ScanStats]:
    """Decode every image once: keep readable ones (with size and source_id), report the rest."""
    stats = ScanStats(num_found=len(records))
    ok = []
    for r in records:
        if r.render is not None:
            ok.append(r)
            continue
        try:
            with Image.open(r.path) as img:
                img.load()                  # full decode: catches truncated files
                w, h = ImageOps.exif_transpose(img).size
            st = os.stat(r.path)
        except Exception as e:              # PIL raises many types for corrupt data
            stats.unreadable.append((r.path, f"{type(e).__name__}: {e}"))
            continue
        r.size = (h, w)
        r.source_id = f"file:{os.path.abspath(r.path)}|{st.st_mtime_ns}|{st.st_size}"
        ok.append(r)
    stats.num_unreadable = len(stats.unreadable)
    stats.num_ok = len(ok)
    if stats.unreadable:
        names = "\n  ".join(f"{p} ({why})" for p, why in stats.unreadable[:20])
        warnings.warn(f"{stats.num_unreadable} of {stats.num_found} image(s) unreadable and left "
                      f"out:\n  {names}", stacklevel=2)
    if not ok:
        raise DataError(f"none of the {stats.num_found} image(s) could be read")
    return ok, stats


# --- generated shapes (embedded default run, no downloads) ---------------------------------

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 220), "yellow": (240, 220, 40)}
SHAPES = ("circle", "square")
BACKGROUND = (128, 128, 128)
ATTRIBUTES = {"colour": tuple(COLOURS), "shape": SHAPES}   # caption "a {colour} {shape}"


def generated_caption(colour: str, shape: str) -> str:
    return f"a {colour} {shape}"


def parse_generated_caption(caption: str) -> Optional[dict]:
    """{"colour": name, "shape": name} of a generated caption; None for any other text (e.g. "")."""
    words = caption.strip().lower().split()
    if len(words) != 3 or words[0] != "a" or words[1] not in COLOURS or words[2] not in SHAPES:
        return None
    return {"colour": words[1], "shape": words[2]}


def generated_records(num_images: int, image_size: int = 64, seed: int = 0) -> list[Record]:
    """`num_images` red / green / blue / yellow circles and squares on grey, captioned "a red circle".

    Every colour x shape pair comes equally often (in a seeded order, one shuffled round of the 8
    pairs after another); each shape gets a seeded size and a small offset from the centre. Same seed ->
    same images and captions."""
    if num_images < 1:
        raise DataError(f"data.num_images = {num_images}: expected >= 1")
    if image_size < 8:
        raise DataError(f"data.image_size = {image_size}: expected >= 8 pixels")
    rng = random.Random(seed)
    pairs = [(c, s) for c in COLOURS for s in SHAPES]
    records, order = [], []
    for i in range(num_images):
        if not order:
            order = rng.sample(pairs, len(pairs))
        colour, shape = order.pop()
        params = (colour, shape, round(rng.uniform(-0.05, 0.05), 4), round(rng.uniform(-0.05, 0.05), 4),
                  round(rng.uniform(0.28, 0.36), 4), image_size)
        records.append(Record(caption=generated_caption(colour, shape), render=partial(_render, *params),
                              size=(image_size, image_size), source_id=f"generated:{seed}:{i}:{params}"))
    return records


def _render(colour, shape, dx, dy, scale, size) -> Image.Image:
    # module-level (via functools.partial) so records pickle into DataLoader workers
    img = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    cx, cy, r = (0.5 + dx) * size, (0.5 + dy) * size, scale * size
    box = [cx - r, cy - r, cx + r - 1, cy + r - 1]
    if shape == "circle":
        draw.ellipse(box, fill=COLOURS[colour])
    else:
        r *= 0.9                                    # about the circle's area; its corners stick out
        draw.rectangle([cx - r, cy - r, cx + r - 1, cy + r - 1], fill=COLOURS[colour])
    return img
