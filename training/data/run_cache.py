"""`data.cache_dir`: the trainer's precomputed VAE latents + text embeddings (training/data/cache.py).

Built on the main process before step 0 (the others wait, then only read), with the run's own VAE
(latents = latent_dist.mean * scaling_factor, as `engine.batches.micro_batch` encodes them) and text encoder(s)
(`models.text.text_embeddings`: prompt_embeds, and pooled_prompt_embeds for SDXL). Entries are keyed by
`encoder_id`, which fingerprints the VAE and text-encoder weights, so a retrained tiny teacher or a
different base model re-encodes.
"""
from __future__ import annotations

import hashlib

import torch

TEXT_KEYS = ("prompt_embeds", "pooled_prompt_embeds")


def fingerprint(modules, n: int = 4096) -> str:
    """Cheap weight fingerprint: every tensor's name, shape, dtype, sum and up to n strided values."""
    h = hashlib.sha256()
    for mi, m in enumerate(modules):
        for name, t in m.state_dict().items():
            t = t.detach().float().cpu().reshape(-1)
            h.update(f"{mi}/{name}/{tuple(t.shape)}/{t.dtype}/{float(t.double().sum())!r}".encode())
            h.update(t[:: max(1, t.numel() // n)].numpy().tobytes())
    return h.hexdigest()[:16]


def encoder_id(base) -> str:
    scale = base.vae.config.scaling_factor
    return f"{base.family}:vae*{scale}:{fingerprint([base.vae])}:text:{fingerprint(base.text_encoders)}"


def image_encoder(base, device):
    """pixels (B, 3, H, W) in [-1, 1] -> latents on the CPU, exactly as engine.batches.micro_batch encodes them."""
    vae = base.vae

    def encode_images(px):
        with torch.no_grad():
            return (vae.encode(px.to(device, torch.float32)).latent_dist.mean * vae.config.scaling_factor).cpu()
    return encode_images


def text_encoder(base, device):
    """captions -> {"prompt_embeds"(, "pooled_prompt_embeds")} on the CPU (models.text.text_embeddings)."""
    from training.models.text import text_embeddings

    def encode_texts(captions):
        return {k: v.cpu() for k, v in text_embeddings(base, list(captions), device).items()}
    return encode_texts


def build_run_cache(cfg, ds, base, device, accelerator):
    """Pixel dataset -> CachedDataset (encodes only what is missing); returns (dataset, stats)."""
    from training.data.cache import build_cache

    eid = encoder_id(base)
    with accelerator.main_process_first():
        cached = build_cache(ds, cfg.data.cache_dir, image_encoder(base, device), text_encoder(base, device),
                             encoder_id=eid)
    stats = {"dir": str(cfg.data.cache_dir), "encoder_id": eid, "reused": cached.stats["num_cached_reused"],
             "encoded": cached.stats["num_cached_encoded"], "text": "prompt_embeds" + (
                 " + pooled_prompt_embeds" if base.family == "sdxl" else "")}
    return cached, stats


def vae_latent_format(vae, pixels, device):
    """Memory format of the VAE's latents (a 2-sample probe): cached latents are given the same layout,
    so the UNet computes bit for bit what it computes on freshly encoded latents."""
    with torch.no_grad():
        px = torch.stack([pixels, pixels]).to(device, torch.float32)
        lat = vae.encode(px).latent_dist.mean * vae.config.scaling_factor  # exactly as engine.batches.micro_batch
    if lat.dim() == 4 and not lat.is_contiguous() and lat.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


class CachedText:
    """Turns a batch's cached embeddings into UNet kwargs; dropped captions get encode("") (computed once)."""

    def __init__(self, base, device, pixel_dataset=None):
        from training.models.text import text_embeddings

        self.base, self.device = base, device
        self.empty = text_embeddings(base, [""], device)   # each (1, ...)
        self.latent_format = torch.contiguous_format
        if pixel_dataset is not None and len(pixel_dataset):
            self.latent_format = vae_latent_format(base.vae, pixel_dataset[0]["pixel_values"], device)

    def kwargs(self, embeds: dict, size_hw=None, crop_tl=None, target_hw=None):
        from training.models.text import embeds_to_unet_kwargs

        return embeds_to_unet_kwargs(self.base, embeds, self.device, size_hw, crop_tl, target_hw)

    def cond_uncond(self, batch, keep, hw):
        """keep: bool (B,) = caption not dropped. Returns (cond, uncond) UNet kwargs."""
        from training.models.text import repeat_embeds

        keep = torch.as_tensor(keep, device=self.device)
        uncond = repeat_embeds(self.empty, len(keep))
        cond = {}
        for k, empty in uncond.items():
            cached = batch[k].to(self.device, empty.dtype)
            cond[k] = torch.where(keep.reshape(-1, *([1] * (cached.dim() - 1))), cached, empty)
        return self.kwargs(cond, *hw), self.kwargs(uncond, *hw)
