"""The workflow table in docs/workflows.md and README.md, made from the recipes' metadata.

The table sits between ``<!-- table -->`` and ``<!-- /table -->`` markers in each file.
"""
from __future__ import annotations

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


def model_hub(file: str) -> str:
    if file.startswith("Hyper-"):
        return HUB
    if file not in MODEL_HUB:
        raise KeyError(f"workflows.docs_table.MODEL_HUB has no hub repo for {file!r}")
    return MODEL_HUB[file]


def docs_table(built: dict) -> str:
    rows = ["| file (example_workflows/) | what it does | model files (hub repo) | steps | cfg | eta |",
            "|---|---|---|---|---|---|"]
    for name, (_, _, m) in built.items():
        cfg = f"{m['cfg']:g}" + (f" (FluxGuidance {m['guidance']:g})" if m.get("guidance") else "")
        eta = "-" if m["eta"] is None else f"{m['eta']:g}"
        models = ", ".join(f"`{f}` ({model_hub(f)})" for f in m["models"])
        rows.append(f"| `{name}.json` | {m['what']} | {models} | {m['steps']} | {cfg} | {eta} |")
    return "\n".join(rows) + "\n"


def docs_with_table(built: dict, path=DOCS) -> str:
    """`path`'s text with the part between the table markers replaced by the current table."""
    text = path.read_text()
    if TABLE_START not in text:
        raise ValueError(f"{path} has no {TABLE_START.strip()} ... {TABLE_END} markers for the workflow table")
    head, rest = text.split(TABLE_START, 1)
    _, tail = rest.split(TABLE_END, 1)
    return head + TABLE_START + docs_table(built) + TABLE_END + tail
