"""Graph pieces the workflow recipes share: base models, prompts, the Notes' lines, sampling chains.

Settings that belong to an official release (steps, cfg, sampler, scheduler, eta, LoRA scale)
are read from ``releases.RELEASES``, the table the loader node outputs, never copied here. Where the
user should get the settings of whatever release (or file) the loader has picked, the sampler's
widget is fed from the loader's output (``from_loader``); the release's value stays in the widget.
"""
from __future__ import annotations

from releases import HUB_REPO, Release

from .graph import Graph, Wire

HUB = HUB_REPO
BASE = {
    "SD15": ("v1-5-pruned-emaonly.safetensors", "stable-diffusion-v1-5/stable-diffusion-v1-5", 512),
    "SDXL": ("sd_xl_base_1.0.safetensors", "stabilityai/stable-diffusion-xl-base-1.0", 1024),
}
PROMPT = "a photo of a cat sitting on a wooden table, soft window light, highly detailed"
NEGATIVE = "blurry, low quality, deformed, watermark, text"
SEED = 42
MULTI_STEP_TCD = (4, 0.3)  # steps, eta: the unified LoRA at several steps; lower eta keeps more detail
# HyperSDLoraLoader's outputs: MODEL, CLIP, steps, cfg, sampler_name, scheduler, eta, info
LOADER_OUTPUT = {"steps": 2, "cfg": 3, "sampler_name": 4, "scheduler": 5, "eta": 6}
RELEASE_FIELD = {"steps": "steps", "cfg": "cfg", "sampler_name": "sampler", "scheduler": "scheduler", "eta": "eta"}
WIRED_NOTE = ("\nSettings: {names} {verb} from the Hyper-SD LoRA Loader's outputs, so picking another release "
              "(or your own file) in the loader changes {them} too.")


def base_note(family: str) -> str:
    ckpt, hub, _ = BASE[family]
    return f"- models/checkpoints/{ckpt}  (hub: {hub})\n"


def lora_note(release: Release) -> str:
    return f"- models/loras/{release.filename}  (hub: {HUB}, file {release.filename}; strength {release.strength})\n"


def from_loader(loader, name: str, release: Release) -> Wire:
    """The loader's `name` output (steps, cfg, sampler_name, scheduler, eta), the release's value kept."""
    return Wire(loader[LOADER_OUTPUT[name]], getattr(release, RELEASE_FIELD[name]))


def wired_note(*names: str) -> str:
    one = len(names) == 1 and " and " not in names[0] and "," not in names[0]
    return WIRED_NOTE.format(names=", ".join(names), verb="comes" if one else "come", them="it" if one else "them")


def fixed_tcd_note(steps: int, eta: float, release: Release) -> str:
    return (f"\nFixed on purpose: {steps} steps and eta {eta} are typed into the TCD nodes, not taken from the "
            f"loader, because this workflow is about the unified LoRA at several steps (the release itself "
            f"recommends {release.steps} step(s) at eta {release.eta:g}).")


def hyper_lora(g: Graph, model, release: Release):
    """The pack's loader with the official release picked: it uses the file from models/loras
    (downloading it when missing) and applies every key format. Its `info` (what was applied, and
    which settings it outputs and why) is shown in a Preview Any node."""
    loader = g.add("HyperSDLoraLoader", model=model, release=release.name, lora_name="None",
                   strength_model=1.0, strength_clip=1.0, download_missing=True)
    g.add("PreviewAny", "LoRA info", source=loader[7])
    return loader


def lora_start(g: Graph, family: str, release: Release, negative: str = ""):
    """Checkpoint, the pack's loader with `release`, positive and negative prompt: (ckpt, loader, pos, neg)."""
    ck = checkpoint(g, family)
    loader = hyper_lora(g, ck[0], release)
    pos, neg = text(g, ck[1], PROMPT, negative)
    return ck, loader, pos, neg


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
    return image


def ksampler(g: Graph, model, pos, neg, latent, release: Release, loader=None):
    """Core KSampler with the release's steps, cfg, sampler and scheduler (from the loader if given)."""
    if loader is None:
        settings = dict(steps=release.steps, cfg=release.cfg, sampler_name=release.sampler, scheduler=release.scheduler)
    else:
        settings = {name: from_loader(loader, name, release) for name in ("steps", "cfg", "sampler_name", "scheduler")}
    return g.add("KSampler", model=model, seed=SEED, positive=pos, negative=neg, latent_image=latent, denoise=1.0,
                 **settings)


def tcd_sample(g: Graph, model, pos, neg, latent, cfg, steps, eta, denoise: float = 1.0, title: str | None = None):
    """The pack's TCD sampler and scheduler in core SamplerCustom (values or loader Wires)."""
    sampler = g.add("HyperSDTCDSampler", eta=eta)
    sigmas = g.add("HyperSDTCDScheduler", model=model, steps=steps, denoise=denoise)
    return g.add("SamplerCustom", title, model=model, add_noise=True, noise_seed=SEED, cfg=cfg, positive=pos,
                 negative=neg, sampler=sampler[0], sigmas=sigmas[0], latent_image=latent)
