"""Model families: ComfyUI's model config names grouped, and the family a LoRA was trained for."""
from __future__ import annotations

from .matching import group_modules

_MODEL_FAMILIES = {
    "SD15": "SD15", "SD15_instructpix2pix": "SD15",
    "SD20": "SD2", "SD21UnclipL": "SD2", "SD21UnclipH": "SD2",
    "SDXL": "SDXL", "SDXLRefiner": "SDXL", "SSD1B": "SDXL", "Segmind_Vega": "SDXL", "KOALA_700M": "SDXL",
    "KOALA_1B": "SDXL", "SDXL_instructpix2pix": "SDXL",
    "SD3": "SD3", "Flux": "FLUX", "FluxSchnell": "FLUX", "FluxInpaint": "FLUX",
}


def model_family(model_config_class_name: str) -> str:
    return _MODEL_FAMILIES.get(model_config_class_name, model_config_class_name)


def lora_family(state_dict: dict, modules: dict | None = None) -> str | None:
    """Best guess of the base family a LoRA was trained for, from key names and cross-attn widths.

    ``modules``: ``group_modules(state_dict)[0]`` when the caller has it already."""
    keys = list(state_dict)
    if any("double_blocks" in k or "single_blocks" in k or "single_transformer_blocks" in k for k in keys):
        return "FLUX"
    if any("joint_blocks" in k or "context_block" in k or ".add_q_proj" in k for k in keys):
        return "SD3"
    modules = modules if modules is not None else group_modules(state_dict)[0]
    for name, roles in modules.items():
        down = state_dict.get(roles.get("down"))
        if down is not None and name.replace(".", "_").endswith("attn2_to_k") and down.ndim >= 2:
            return {768: "SD15", 1024: "SD2", 2048: "SDXL"}.get(down.shape[1])
    if any(k.startswith("lora_te2_") or k.startswith("text_encoder_2.") for k in keys):
        return "SDXL"
    return None
