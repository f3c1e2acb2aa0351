"""Kohya-format LoRA export with the TRUE alpha (diffusers' convert_state_dict_to_kohya writes alpha = rank).

The one safetensors writer of the trainer (`save_file_atomic`, temp file + os.replace); training/merge.py
uses it for merged and re-ranked LoRAs too.
"""
from __future__ import annotations

import json
import os
import tempfile

import torch


def kohya_state_dict(unet, adapter="default", dtype=torch.float32) -> dict:
    """peft LoRA adapter -> {lora_unet_<path with _>.lora_down.weight / .lora_up.weight / .alpha}."""
    from .merge import kohya_state_dict as modules_to_state_dict, peft_to_kohya

    try:
        modules = peft_to_kohya(unet, adapter)
    except ValueError:
        raise ValueError(f"no LoRA layers named {adapter!r} found on the UNet (was add_lora called?)") from None
    return modules_to_state_dict(modules, dtype)


def lora_metadata(cfg, family, prediction_type) -> dict:
    tscd = [s for s in cfg.stages if s.type in ("tscd", "adversarial")] or cfg.stages
    steps = max(1, tscd[-1].segments)
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
    """Write safetensors to a temp file in the target folder, then rename (never a half-written file)."""
    from safetensors.torch import save_file

    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=folder)
    os.close(fd)
    try:
        meta = {k: str(v) for k, v in metadata.items()} if metadata else None
        save_file({k: v.contiguous() for k, v in state.items()}, tmp, metadata=meta)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def export_lora(unet, path, metadata=None, adapter="default"):
    state = kohya_state_dict(unet, adapter)
    save_file_atomic(state, path, metadata)
    return len(state)
