"""Kohya-format LoRA export with the TRUE alpha (diffusers' convert_state_dict_to_kohya writes alpha = rank)."""
from __future__ import annotations

import json
import os
import tempfile

import torch


def kohya_state_dict(unet, adapter="default", dtype=torch.float32) -> dict:
    """peft LoRA layers -> {lora_unet_<path with _>.lora_down.weight / .lora_up.weight / .alpha}."""
    out = {}
    for name, module in unet.named_modules():
        if not hasattr(module, "lora_A") or adapter not in getattr(module, "lora_A", {}):
            continue
        key = "lora_unet_" + name.replace(".", "_")
        out[f"{key}.lora_down.weight"] = module.lora_A[adapter].weight.detach().to("cpu", dtype).contiguous()
        out[f"{key}.lora_up.weight"] = module.lora_B[adapter].weight.detach().to("cpu", dtype).contiguous()
        out[f"{key}.alpha"] = torch.tensor(float(module.lora_alpha[adapter]), dtype=dtype)
    if not out:
        raise ValueError("no LoRA layers found on the UNet (was add_lora called?)")
    return out


def lora_metadata(cfg, family, prediction_type) -> dict:
    last = cfg.stages[-1]
    steps = max(1, last.segments)
    return {
        "ss_network_module": "networks.lora", "ss_network_dim": str(cfg.lora.rank),
        "ss_network_alpha": str(cfg.lora.alpha),
        "hypersd.base_family": family, "hypersd.prediction_type": prediction_type,
        "hypersd.stages": json.dumps([{"type": s.type, "segments": s.segments, "steps": s.steps} for s in cfg.stages]),
        "hypersd.recommended_sampler": "tcd", "hypersd.recommended_steps": str(steps),
        "hypersd.recommended_eta": "1.0" if steps == 1 else "0.3", "hypersd.recommended_cfg": "1.0",
        "hypersd.base": cfg.model.base,
    }


def save_file_atomic(state: dict, path: str, metadata: dict | None = None):
    from safetensors.torch import save_file

    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=folder)
    os.close(fd)
    try:
        save_file(state, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def export_lora(unet, path, metadata=None):
    state = kohya_state_dict(unet)
    save_file_atomic(state, path, metadata)
    return len(state)
