"""score_distill mode full: the student is a separate, fully trainable UNet copy (the base with the
earlier stages' LoRAs folded in) with its own AdamW, exported as a diffusers UNet folder
(lora_files/export.py: export_full_unet)."""
from __future__ import annotations

import torch

FULL_KEYS = ("full_unet", "full_opt")  # its entries in ctx.persistent (saved in every later checkpoint)


def folded_unet_copy(unet, adapters):
    """A plain diffusers UNet (no peft layers) = base weights of `unet` + the named adapters folded in."""
    from diffusers import UNet2DConditionModel

    from training.lora_files.peft_bridge import fold_kohya_into, peft_to_kohya

    full = UNet2DConditionModel.from_config(unet.config)
    state = {k.replace(".base_layer", ""): v for k, v in unet.state_dict().items() if "lora_" not in k}
    full.load_state_dict(state)  # strict: every weight of the base is there
    full.to(next(unet.parameters()).device)  # fp32 master weights (AdamW), whatever the base dtype
    for name in adapters:
        fold_kohya_into(full, peft_to_kohya(unet, name), source=f"adapter {name!r}")
    return full


def ensure_full_unet(ctx, p: dict):
    """-> (UNet copy, its AdamW): the one already in ctx.persistent, or a new one (base + the active
    earlier adapters folded in). Resumed inside the stage, the engine then loads both from the checkpoint
    (OwnStudent.keys)."""
    if "full_unet" in ctx.persistent:
        return ctx.persistent["full_unet"], ctx.persistent["full_opt"]
    full = folded_unet_copy(ctx.unet, [a for a in ctx.adapters.active if a != "fake"])
    full.requires_grad_(True).train()
    if ctx.cfg.optim.gradient_checkpointing:
        full.enable_gradient_checkpointing()
    o = ctx.cfg.optim
    opt = torch.optim.AdamW(full.parameters(), lr=float(p["lr"]) or o.lr, betas=tuple(o.betas),
                            weight_decay=o.weight_decay)
    ctx.persistent.update(full_unet=full, full_opt=opt)
    return full, opt
