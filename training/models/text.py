"""Prompts -> UNet conditioning: SD1.5 (last hidden state) and SDXL (both encoders, pooled embeds and
time_ids). `text_embeddings` is what the latent/text cache stores; `embeds_to_unet_kwargs` turns
embeddings into UNet kwargs."""
from __future__ import annotations

import torch

from training.models.base import Base


def _tokenize(tokenizer, prompts, device):
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids.to(device)


@torch.no_grad()
def encode_prompts(base: Base, prompts: list[str], device, size_hw=None, crop_tl=None, target_hw=None):
    """Prompts -> UNet kwargs. SD1.5: last hidden state. SDXL: penultimate states of both encoders
    concatenated, pooled text_embeds from encoder 2 and time_ids (original size, crop, target size)."""
    return embeds_to_unet_kwargs(base, text_embeddings(base, prompts, device), device, size_hw, crop_tl, target_hw)


def repeat_embeds(embeds: dict, n: int) -> dict:
    """(1, ...) embeddings (e.g. of the empty prompt, encoded once) repeated to a batch of n."""
    return {k: v.expand(n, *v.shape[1:]).contiguous() for k, v in embeds.items()}


@torch.no_grad()
def text_embeddings(base: Base, prompts: list[str], device) -> dict:
    """Prompts -> {"prompt_embeds"} (SD1.5) or {"prompt_embeds", "pooled_prompt_embeds"} (SDXL):
    what the latent/text cache stores; `embeds_to_unet_kwargs` turns them into UNet kwargs."""
    if base.text_fn is not None:
        return base.text_fn(prompts, device)
    if base.family == "sd15":
        te = base.text_encoders[0]
        return {"prompt_embeds": te(_tokenize(base.tokenizers[0], prompts, device))[0]}
    states, pooled = [], None
    for te, tok in zip(base.text_encoders, base.tokenizers):
        out = te(_tokenize(tok, prompts, device), output_hidden_states=True)
        states.append(out.hidden_states[-2])
        pooled = out[0]  # CLIPTextModelWithProjection: text_embeds
    return {"prompt_embeds": torch.cat(states, -1), "pooled_prompt_embeds": pooled}


def embeds_to_unet_kwargs(base: Base, embeds: dict, device, size_hw=None, crop_tl=None, target_hw=None) -> dict:
    if base.family == "sd15":
        return {"encoder_hidden_states": embeds["prompt_embeds"]}
    pooled = embeds["pooled_prompt_embeds"]
    n = len(pooled)

    def col(v, default):
        v = torch.as_tensor(default if v is None else v, device=device).reshape(-1, 2)
        return v.expand(n, 2) if len(v) == 1 else v
    time_ids = torch.cat([col(size_hw, (1024, 1024)), col(crop_tl, (0, 0)), col(target_hw, (1024, 1024))], 1)
    return {"encoder_hidden_states": embeds["prompt_embeds"],
            "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids.to(pooled.dtype)}}
