"""Kohya-format LoRA files with the TRUE alpha per module (diffusers' convert_state_dict_to_kohya
writes alpha = rank, wrong when lora_alpha != rank).

A module is (down, up, alpha) with delta W = (alpha / rank) * up @ down, where a linear LoRA has
down [r, in], up [out, r] and a conv LoRA has down [r, in, kh, kw], up [out, r, 1, 1].
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from training.files import save_file_atomic

PREFIX = "lora_unet_"
DOWN, UP, ALPHA = ".lora_down.weight", ".lora_up.weight", ".alpha"


@dataclass
class LoraModule:
    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta(self) -> torch.Tensor:
        """delta W in float64, shaped like the base weight ([out, in] or [out, in, kh, kw])."""
        down, up = self.down.double(), self.up.double()
        flat = up.reshape(up.shape[0], self.rank) @ down.reshape(self.rank, -1)
        return (self.alpha / self.rank) * flat.reshape(up.shape[0], *down.shape[1:])


def kohya_name(module_path: str) -> str:
    """UNet module path (diffusers names) -> kohya module key."""
    return PREFIX + module_path.replace(".", "_")


def kohya_file_problem(path: str) -> str | None:
    """Why `path` cannot be a kohya LoRA, from its header alone (None: it may be): missing, not a
    safetensors file (a pickle is never opened as one), or no '*.lora_down.weight' keys."""
    from safetensors import SafetensorError, safe_open

    if not os.path.isfile(path):
        return f"file not found: {path}"
    try:
        with safe_open(path, "pt") as f:
            keys = list(f.keys())
    except (SafetensorError, OSError, ValueError) as e:
        return (f"{path} is not a readable safetensors file ({e}); LoRAs are loaded only from .safetensors "
                "(pickled .ckpt / .pt / .bin files are never opened)")
    if not any(k.endswith(DOWN) for k in keys):
        return f"{path}: no kohya LoRA keys ('*{DOWN}') found"
    return None


def load_kohya(path: str) -> dict[str, LoraModule]:
    """Read a kohya LoRA file -> {module key without suffix: LoraModule}; alpha defaults to rank.
    A file that is not a kohya safetensors LoRA is a ValueError naming it (FileNotFoundError if missing)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise FileNotFoundError(f"LoRA file not found: {path}")
    why = kohya_file_problem(path)
    if why:
        raise ValueError(why)
    try:
        sd = load_file(path)
    except (SafetensorError, OSError) as e:  # a header that parses but truncated or corrupt data
        raise ValueError(f"{path} is not a readable safetensors file ({e})") from None
    modules = {}
    for key in sd:
        if key.endswith(DOWN):
            name = key[: -len(DOWN)]
            if name + UP not in sd:
                raise ValueError(f"{path}: {key} has no matching {name + UP}")
            down, up = sd[key], sd[name + UP]
            alpha = float(sd[name + ALPHA]) if name + ALPHA in sd else float(down.shape[0])
            modules[name] = LoraModule(down, up, alpha)
    if not modules:
        raise ValueError(f"{path}: no kohya LoRA keys ('*{DOWN}') found")
    return modules


def modules_to_state_dict(modules: dict[str, LoraModule], dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Kohya tensors; a non-finite value is an error (a diverged LoRA is never written)."""
    sd = {}
    for name, m in modules.items():
        if not (torch.isfinite(m.down).all() and torch.isfinite(m.up).all()):
            raise ValueError(f"LoRA module {name} has NaN or inf weights: refusing to write it")
        sd[name + DOWN] = m.down.to(dtype).contiguous()
        sd[name + UP] = m.up.to(dtype).contiguous()
        sd[name + ALPHA] = torch.tensor(float(m.alpha), dtype=dtype)
    return sd


def save_kohya(path: str, modules: dict[str, LoraModule], metadata: dict | None = None, dtype=torch.float32):
    """Atomic write of a kohya LoRA with the true alpha per module."""
    save_file_atomic(modules_to_state_dict(modules, dtype), path, metadata)
