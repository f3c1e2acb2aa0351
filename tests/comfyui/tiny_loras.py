"""Seeded LoRA files for the tiny models of ``tiny_checkpoints``, in kohya and PEFT/diffusers keys.

Modules are named by their diffusers path (what kohya "lora_unet_" and PEFT keys use), taken from
``UNetSpec.diffusers_modules()``.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from .tiny_checkpoints import SD15_UNET, UNetSpec, atomic_save

ATTENTION_TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                     "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")


def lora_target_modules(spec: UNetSpec, targets=ATTENTION_TARGETS) -> dict:
    """Diffusers module path -> weight shape for modules whose path ends with one of ``targets``."""
    return {path: shape for path, shape in spec.diffusers_modules().items()
            if any(path.endswith(t) for t in targets)}


def _lora_pair(shape, rank: int, gen: torch.Generator, dtype):
    out_features, in_features = shape[0], shape[1]
    kernel = tuple(shape[2:])
    down = torch.randn((rank, in_features, *kernel), generator=gen) / math.sqrt(in_features)
    up = torch.randn((out_features, rank, *((1,) * len(kernel))), generator=gen) / math.sqrt(rank)
    return down.to(dtype), up.to(dtype)


def lora_weights(spec: UNetSpec, rank: int = 4, targets=ATTENTION_TARGETS, seed: int = 0,
                 dtype=torch.float32) -> dict:
    """Diffusers module path -> (down [rank, in, ...], up [out, rank, ...]), seeded."""
    gen = torch.Generator().manual_seed(seed)
    modules = lora_target_modules(spec, targets)
    if not modules:
        raise ValueError(f"no UNet module matches targets {targets!r}")
    return {path: _lora_pair(shape, rank, gen, dtype) for path, shape in sorted(modules.items())}


def kohya_lora_state_dict(weights: dict, alpha: float | None) -> dict:
    """kohya keys: lora_unet_<path with _>.lora_down.weight / .lora_up.weight / .alpha."""
    out = {}
    for path, (down, up) in weights.items():
        key = "lora_unet_" + path.replace(".", "_")
        out[f"{key}.lora_down.weight"] = down
        out[f"{key}.lora_up.weight"] = up
        if alpha is not None:
            out[f"{key}.alpha"] = torch.tensor(float(alpha), dtype=down.dtype)
    return out


def peft_lora_state_dict(weights: dict, prefix: str = "unet.") -> dict:
    """PEFT/diffusers keys: <prefix><path>.lora_A.weight (down) / .lora_B.weight (up).
    prefix "unet." is the diffusers pipeline format; "base_model.model." is raw PEFT."""
    out = {}
    for path, (down, up) in weights.items():
        out[f"{prefix}{path}.lora_A.weight"] = down
        out[f"{prefix}{path}.lora_B.weight"] = up
    return out


def build_kohya_lora(path, spec: UNetSpec = SD15_UNET, rank: int = 4, alpha: float | None = 4.0,
                     targets=ATTENTION_TARGETS, seed: int = 0, dtype=torch.float16) -> Path:
    return atomic_save(kohya_lora_state_dict(lora_weights(spec, rank, targets, seed, dtype), alpha), path)


def build_peft_lora(path, spec: UNetSpec = SD15_UNET, rank: int = 4, targets=ATTENTION_TARGETS, seed: int = 0,
                    prefix: str = "unet.", dtype=torch.float16, metadata: dict | None = None) -> Path:
    return atomic_save(peft_lora_state_dict(lora_weights(spec, rank, targets, seed, dtype), prefix), path,
                       metadata=metadata)
