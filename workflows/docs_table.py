"""The workflow table in docs/workflows.md and README.md, made from the recipes' metadata.

The table sits between ``<!-- table -->`` and ``<!-- /table -->`` markers in each file; README.md
also has ``<!-- pictures -->`` markers for one picture per kind of workflow (``workflows.pictures``
draws them into docs/images/workflows/).
"""
from __future__ import annotations

import re

from .blocks import BASE, HUB
from .wfkit import REPO

# Where each model file of the table comes from (the Notes inside the workflows say the same).
MODEL_HUB = {
    "v1-5-pruned-emaonly.safetensors": BASE["SD15"][1],
    "sd_xl_base_1.0.safetensors": BASE["SDXL"][1],
    "control_v11p_sd15_scribble.safetensors": "lllyasviel/ControlNet-v1-1",
    "control_v11p_sd15_canny.safetensors": "lllyasviel/ControlNet-v1-1",
    "controlnet-canny-sdxl-1.0.safetensors": "diffusers/controlnet-canny-sdxl-1.0",
    "sd3_medium_incl_clips_t5xxlfp16.safetensors": "stabilityai/stable-diffusion-3-medium",
    "flux1-dev.safetensors": "black-forest-labs/FLUX.1-dev",
    "ae.safetensors": "black-forest-labs/FLUX.1-dev",
    "clip_l.safetensors": "comfyanonymous/flux_text_encoders",
    "t5xxl_fp16.safetensors": "comfyanonymous/flux_text_encoders",
}
DOCS = REPO / "docs" / "workflows.md"
README = REPO / "README.md"
TABLE_START, TABLE_END = "<!-- table -->\n", "<!-- /table -->"
PICTURES_START, PICTURES_END = "<!-- pictures -->\n", "<!-- /pictures -->"
PICTURES_DIR = "docs/images/workflows"


def kind_slug(kind: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", kind.lower()).strip("-")


KIND_ORDER = ("N-step LoRA", "CFG LoRA", "unified LoRA + TCD", "1-step UNet", "ControlNet", "img2img", "inpainting",
              "hires fix", "1-step UNet img2img", "side by side", "SD3", "FLUX")


def representatives(built: dict) -> dict:
    """kind -> the first workflow (by name) of that kind, kinds in KIND_ORDER: one picture per kind."""
    out = {}
    for name, (_, _, meta) in sorted(built.items()):
        if meta["kind"] not in KIND_ORDER:
            raise KeyError(f"workflows.docs_table.KIND_ORDER has no place for kind {meta['kind']!r} ({name})")
        out.setdefault(meta["kind"], name)
    return {kind: out[kind] for kind in KIND_ORDER if kind in out}


def pictures_table(built: dict, per_row: int = 2) -> str:
    cells = [f"**{kind}** (`{name}.json`)<br>![{kind}]({PICTURES_DIR}/{kind_slug(kind)}.png)"
             for kind, name in representatives(built).items()]
    rows = [cells[i:i + per_row] + [""] * (per_row - len(cells[i:i + per_row])) for i in range(0, len(cells), per_row)]
    return "\n".join(["| " + " | ".join([""] * per_row) + " |", "|" + "---|" * per_row]
                     + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


def model_hub(file: str) -> str:
    if file.startswith("Hyper-"):
        return HUB
    if file not in MODEL_HUB:
        raise KeyError(f"workflows.docs_table.MODEL_HUB has no hub repo for {file!r}")
    return MODEL_HUB[file]


def _shown(value) -> str:
    """A number as the table prints it; text (several panels' settings) as it is; None as '-'."""
    return "-" if value is None else value if isinstance(value, str) else f"{value:g}"


def docs_table(built: dict) -> str:
    rows = ["| file (example_workflows/) | what it does | model files (hub repo) | steps | cfg | eta |",
            "|---|---|---|---|---|---|"]
    for name, (_, _, m) in built.items():
        cfg = _shown(m["cfg"]) + (f" (FluxGuidance {m['guidance']:g})" if m.get("guidance") else "")
        eta = _shown(m["eta"])
        models = ", ".join(f"`{f}` ({model_hub(f)})" for f in m["models"])
        rows.append(f"| `{name}.json` | {m['what']} | {models} | {m['steps']} | {cfg} | {eta} |")
    return "\n".join(rows) + "\n"


def _between(text: str, start: str, end: str, content: str, path) -> str:
    if start not in text:
        raise ValueError(f"{path} has no {start.strip()} ... {end} markers")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return head + start + content + end + tail


def docs_with_table(built: dict, path=DOCS) -> str:
    """`path`'s text with the table (and, where there are markers for them, the pictures) current."""
    text = _between(path.read_text(), TABLE_START, TABLE_END, docs_table(built), path)
    if PICTURES_START in text:
        text = _between(text, PICTURES_START, PICTURES_END, pictures_table(built), path)
    return text
