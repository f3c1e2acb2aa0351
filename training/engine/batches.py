"""The global micro-batch: this process's slice of the samples plus every random number of the step,
drawn for the whole global batch from (seed, micro-batch index) so any process count and a resumed run
see the same numbers per sample."""
from __future__ import annotations

import torch

U_WIDTH = 8  # columns of batch["u"]; stages/base.py's U table says which decision reads which column


def micro_batch(run, m: int) -> dict:
    """Global micro-batch m -> {latents, noise, u, step_u, cond, uncond, captions} on the run's device.
    With data.cache_dir the samples carry latents and text embeddings (no VAE / text-encoder pass)."""
    from training.data import collate
    from training.stages.base import U

    cfg, acc, data = run.cfg, run.accelerator, run.data
    n, r = acc.num_processes, acc.process_index
    samples = data.stream.batch(m) if data.stream is not None else indexed_samples(data, m, n, r)
    b, batch = len(samples), collate(samples)
    latents = encode_latents(run, batch)
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + m + 17)
    noise = torch.randn((b * n, *latents.shape[1:]), generator=g)[r * b:(r + 1) * b]
    u_all = torch.rand((b * n, U_WIDTH), generator=g, dtype=torch.float64)
    u = u_all[r * b:(r + 1) * b]
    keep = [float(uu[U["caption_dropout"]]) >= cfg.data.caption_dropout for uu in u]
    captions = [c if k else "" for c, k in zip(batch["caption"], keep)]
    cond, uncond = text_conditioning(run, batch, captions, keep)
    return {"latents": latents.to(run.dtype), "noise": noise.to(run.device, run.dtype), "u": u.to(run.device),
            "step_u": u_all[0].to(run.device),  # per-step choices shared by the global batch (the ReFL stop step)
            "cond": cond, "uncond": uncond, "captions": captions}


def indexed_samples(data, m: int, n: int, r: int) -> list:
    """This process's slice of global micro-batch m of an indexed dataset (its sampler's order)."""
    epoch, pos = divmod(m, len(data.sampler))
    if hasattr(data.dataset, "set_epoch"):  # a CachedDataset has nothing to re-augment
        data.dataset.set_epoch(epoch)
    global_idx = data.sampler.global_batches(epoch)[pos]
    b = len(global_idx) // n
    return [data.dataset[i] for i in global_idx[r * b:(r + 1) * b]]


def encode_latents(run, batch):
    if "latents" in batch:
        # the VAE's memory layout (e.g. channels-last): the UNet's float results depend on it
        fmt = run.data.cached_text.latent_format
        return batch["latents"].to(run.device, torch.float32).contiguous(memory_format=fmt)
    vae = run.base.vae
    with torch.no_grad():
        px = batch["pixel_values"].to(run.device, torch.float32)
        return vae.encode(px).latent_dist.mean * vae.config.scaling_factor


def text_conditioning(run, batch, captions, keep):
    """(cond, uncond) UNet kwargs; a dropped caption is conditioned on the empty prompt."""
    from training.models.text import embeds_to_unet_kwargs, repeat_embeds

    hw = batch.get("original_size"), batch.get("crop_top_left"), batch.get("target_size")
    if run.data.cached_text is not None and "prompt_embeds" in batch:
        return run.data.cached_text.cond_uncond(batch, keep, hw)
    uncond = embeds_to_unet_kwargs(run.base, repeat_embeds(run.data.empty_text, len(captions)), run.device, *hw)
    return run.encode(captions, *hw), uncond
