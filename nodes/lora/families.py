"""Model families: ComfyUI's model config names grouped, and the family a LoRA was trained for."""
from __future__ import annotations

from .keys import split_key

_MODEL_FAMILIES = {
    "SD15": "SD15", "SD15_instructpix2pix": "SD15",
    "SD20": "SD2", "SD21UnclipL": "SD2", "SD21UnclipH": "SD2",
    "SDXL": "SDXL", "SDXLRefiner": "SDXL", "SSD1B": "SDXL", "Segmind_Vega": "SDXL", "KOALA_700M": "SDXL",
    "KOALA_1B": "SDXL", "SDXL_instructpix2pix": "SDXL",
    "SD3": "SD3", "Flux": "FLUX", "FluxSchnell": "FLUX", "FluxInpaint": "FLUX",
}


def model_family(model_config_class_name: str) -> str:
    return _MODEL_FAMILIES.get(model_config_class_name, model_config_class_name)


def lora_family(state_dict: dict) -> str | None:
    """Best guess of the base family a LoRA was trained for, from key names and cross-attn widths."""
    keys = list(state_dict)
    if any("double_blocks" in k or "single_blocks" in k or "single_transformer_blocks" in k for k in keys):
        return "FLUX"
    if any("joint_blocks" in k or "context_block" in k or ".add_q_proj" in k for k in keys):
        return "SD3"
    for k, t in state_dict.items():
        split = split_key(k)
        if split and split[1] == "down" and split[0].replace(".", "_").endswith("attn2_to_k") and t.ndim >= 2:
            return {768: "SD15", 1024: "SD2", 2048: "SDXL"}.get(t.shape[1])
    if any(k.startswith("lora_te2_") or k.startswith("text_encoder_2.") for k in keys):
        return "SDXL"
    return None
