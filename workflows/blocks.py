"""Graph pieces the workflow recipes share: base models, prompts, the Notes' lines, sampling chains.

Settings that belong to an official release (steps, cfg, sampler, scheduler, eta, LoRA scale)
are read from ``releases.RELEASES``, the table the loader node outputs, never copied here.
"""
from __future__ import annotations

from releases import HUB_REPO, Release

from .graph import Graph

HUB = HUB_REPO
BASE = {
    "SD15": ("v1-5-pruned-emaonly.safetensors", "stable-diffusion-v1-5/stable-diffusion-v1-5", 512),
    "SDXL": ("sd_xl_base_1.0.safetensors", "stabilityai/stable-diffusion-xl-base-1.0", 1024),
}
PROMPT = "a photo of a cat sitting on a wooden table, soft window light, highly detailed"
NEGATIVE = "blurry, low quality, deformed, watermark, text"
SEED = 42


def base_note(family: str) -> str:
    ckpt, hub, _ = BASE[family]
    return f"- models/checkpoints/{ckpt}  (hub: {hub})\n"


def lora_note(release: Release) -> str:
    return f"- models/loras/{release.filename}  (hub: {HUB}, file {release.filename}; strength {release.strength})\n"


def hyper_lora(g: Graph, model, release: Release):
    """The pack's loader with the official release picked: it uses the file from models/loras
    (downloading it when missing) and applies every key format."""
    return g.add("HyperSDLoraLoader", model=model, release=release.name, lora_name="None",
                 strength_model=1.0, strength_clip=1.0, download_missing=True)


def checkpoint(g: Graph, family: str):
    return g.add("CheckpointLoaderSimple", ckpt_name=BASE[family][0])


def text(g: Graph, clip, positive: str, negative: str):
    pos = g.add("CLIPTextEncode", "Positive prompt", text=positive, clip=clip)
    neg = g.add("CLIPTextEncode", "Negative prompt", text=negative, clip=clip)
    return pos, neg


def empty_latent(g: Graph, family: str):
    size = BASE[family][2]
    return g.add("EmptyLatentImage", width=size, height=size, batch_size=1)


def decode_save(g: Graph, latent, vae, prefix: str):
    image = g.add("VAEDecode", samples=latent, vae=vae)
    g.add("SaveImage", images=image[0], filename_prefix=f"HyperSD/{prefix}")


def ksampler(g: Graph, model, pos, neg, latent, release: Release):
    """Core KSampler with the release's steps, cfg, sampler and scheduler."""
    return g.add("KSampler", model=model, seed=SEED, steps=release.steps, cfg=release.cfg,
                 sampler_name=release.sampler, scheduler=release.scheduler, positive=pos, negative=neg,
                 latent_image=latent, denoise=1.0)


def tcd_sample(g: Graph, model, pos, neg, latent, release: Release, steps: int, eta: float, denoise: float = 1.0):
    """The pack's TCD sampler and scheduler in core SamplerCustom, at the unified release's cfg."""
    sampler = g.add("HyperSDTCDSampler", eta=eta)
    sigmas = g.add("HyperSDTCDScheduler", model=model, steps=steps, denoise=denoise)
    return g.add("SamplerCustom", model=model, add_noise=True, noise_seed=SEED, cfg=release.cfg, positive=pos,
                 negative=neg, sampler=sampler[0], sigmas=sigmas[0], latent_image=latent)
