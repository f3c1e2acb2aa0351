"""The usages people ask for beyond the official examples, core nodes plus the pack's:
inpainting, hires fix, 1-step UNet img2img, and the base model beside Hyper-SD from the same seed.

Registered in ``recipes.WORKFLOWS`` under their function names.
"""
from __future__ import annotations

from releases import ONE_STEP_UNET_COMFY, get_release

from .blocks import (BASE, HUB, MULTI_STEP_TCD, NEGATIVE, PROMPT, SEED, base_note, decode_save, empty_latent,
                     fixed_tcd_note, from_loader, lora_note, lora_start, tcd_sample, text, wired_note)
from .graph import Graph

USAGES: dict = {}
HIRES_SCALE, HIRES_DENOISE = 1.5, 0.5
ONE_STEP_IMG2IMG_TIMESTEP = 600  # below the 800 it was trained at: less noise, more of the input image kept
SIDE_BY_SIDE_BASE = dict(steps=25, cfg=7.0, sampler_name="euler", scheduler="normal")
SIDE_BY_SIDE_HYPER = ((1, 1.0), (2, 0.3), (4, 0.3))  # (steps, eta): eta 1.0 at 1 step, lower at more steps


def usage(fn):
    USAGES[fn.__name__] = fn
    return fn


@usage
def hypersd_sd15_inpaint_tcd(g: Graph):
    rel, (steps, eta) = get_release("Hyper-SD15-1step-lora"), MULTI_STEP_TCD
    g.note(base_note("SD15") + lora_note(rel) +
           "- input/example.png: your image. Mark the area to repaint: right-click Load Image -> Open in "
           "MaskEditor and paint it (or load a PNG whose transparent pixels are the area).\n"
           f"\nInpainting: SetLatentNoiseMask keeps the latent outside the mask, unified LoRA + TCD repaints "
           f"inside at denoise 1.0 (lower, e.g. 0.7, keeps more of what was there), {steps} steps, eta {eta}, "
           f"cfg {rel.cfg:g}." + fixed_tcd_note(steps, eta, rel) + wired_note("cfg"))
    ck, model, pos, neg = lora_start(g, "SD15", rel)
    img = g.add("LoadImage", image="example.png")
    lat = g.add("VAEEncode", pixels=img[0], vae=ck[2])
    masked = g.add("SetLatentNoiseMask", samples=lat[0], mask=img[1])
    s = tcd_sample(g, model[0], pos[0], neg[0], masked[0], from_loader(model, "cfg", rel), steps, eta)
    decode_save(g, s[0], ck[2], "sd15_inpaint_tcd")
    return dict(what="SD15 inpainting (mask from Load Image), unified LoRA + TCD", family="SD15",
                models=[BASE["SD15"][0], rel.filename], steps=steps, cfg=rel.cfg, eta=eta, kind="inpainting")


@usage
def hypersd_sd15_hires_fix_tcd(g: Graph):
    rel, (steps, eta) = get_release("Hyper-SD15-1step-lora"), MULTI_STEP_TCD
    size = BASE["SD15"][2]
    g.note(base_note("SD15") + lora_note(rel) +
           f"\nHires fix: unified LoRA + TCD at {size} px with the loader's steps and eta ({rel.steps} step, eta "
           f"{rel.eta:g} for this release), the latent upscaled x{HIRES_SCALE}, then TCD again at denoise "
           f"{HIRES_DENOISE} ({steps} steps, eta {eta}) to add detail at {int(size * HIRES_SCALE)} px."
           + wired_note("the low-res pass's steps, eta", "cfg") +
           f"\nFixed on purpose: the hires pass's {steps} steps, eta {eta} and denoise {HIRES_DENOISE}, typed "
           "into its TCD nodes (a second pass keeps the composition only below denoise ~0.6).")
    ck, model, pos, neg = lora_start(g, "SD15", rel)
    cfg = from_loader(model, "cfg", rel)
    low = tcd_sample(g, model[0], pos[0], neg[0], empty_latent(g, "SD15")[0], cfg, from_loader(model, "steps", rel),
                     from_loader(model, "eta", rel), title="Low-res pass")
    up = g.add("LatentUpscaleBy", samples=low[0], upscale_method="nearest-exact", scale_by=HIRES_SCALE)
    high = tcd_sample(g, model[0], pos[0], neg[0], up[0], cfg, steps, eta, denoise=HIRES_DENOISE, title="Hires pass")
    decode_save(g, high[0], ck[2], "sd15_hires_fix_tcd")
    return dict(what=f"SD15 hires fix: TCD at {size} px, latent x{HIRES_SCALE}, TCD at denoise {HIRES_DENOISE}",
                family="SD15", models=[BASE["SD15"][0], rel.filename], steps=f"{rel.steps} + {steps}", cfg=rel.cfg,
                eta=f"{rel.eta:g} / {eta:g}", kind="hires fix")


@usage
def hypersd_sdxl_1step_unet_img2img(g: Graph):
    ckpt, t = ONE_STEP_UNET_COMFY, ONE_STEP_IMG2IMG_TIMESTEP
    g.note(f"- models/checkpoints/{ckpt}  (hub: {HUB}, file {ckpt}: full SDXL checkpoint with the 1-step UNet)\n"
           "- input/example.png: the image to transform (about 1024 x 1024)\n"
           f"\n1-step UNet img2img: the image's latent noised to timestep {t} and one step to x0; the timestep is "
           f"the strength (800, where the UNet was trained, changes most; 400-600 keeps more of the image). "
           "cfg 1. No LoRA, so no loader settings.")
    ck = g.add("CheckpointLoaderSimple", ckpt_name=ckpt)
    pos, neg = text(g, ck[1], PROMPT, "")
    img = g.add("LoadImage", image="example.png")
    lat = g.add("VAEEncode", pixels=img[0], vae=ck[2])
    sampler = g.add("HyperSDOneStepSampler", unit_variance_noise=True)
    sigmas = g.add("HyperSDOneStepScheduler", model=ck[0], timestep=t)
    s = g.add("SamplerCustom", model=ck[0], add_noise=True, noise_seed=SEED, cfg=1.0, positive=pos[0],
              negative=neg[0], sampler=sampler[0], sigmas=sigmas[0], latent_image=lat[0])
    decode_save(g, s[0], ck[2], "sdxl_1step_unet_img2img")
    return dict(what=f"SDXL 1-step UNet img2img at timestep {t}", family="SDXL", models=[ckpt], steps=1, cfg=1.0,
                eta=None, kind="1-step UNet img2img")


@usage
def hypersd_sdxl_side_by_side(g: Graph):
    rel = get_release("Hyper-SDXL-1step-lora")
    base = SIDE_BY_SIDE_BASE
    hyper = ", ".join(f"{n} step{'s' if n > 1 else ''} (eta {e:g})" for n, e in SIDE_BY_SIDE_HYPER)
    g.note(base_note("SDXL") + lora_note(rel) +
           f"\nSide by side from the same seed ({SEED}) and prompt, left to right: the base model at {base['steps']} "
           f"steps ({base['sampler_name']} + {base['scheduler']}, cfg {base['cfg']:g}, negative prompt), then the "
           f"unified Hyper-SD LoRA with TCD at {hyper}, cfg {rel.cfg:g}: one image, 4 panels, so you see what "
           "the speed costs." + wired_note("the Hyper-SD panels' cfg") +
           "\nFixed on purpose: the step counts and etas of the panels (the point of the comparison) and the "
           "base model's settings.")
    ck, model, pos, neg = lora_start(g, "SDXL", rel, NEGATIVE)
    lat = empty_latent(g, "SDXL")
    k = g.add("KSampler", f"Base model, {base['steps']} steps", model=ck[0], seed=SEED, positive=pos[0],
              negative=neg[0], latent_image=lat[0], denoise=1.0, **base)
    panels = [g.add("VAEDecode", samples=k[0], vae=ck[2])]
    for steps, eta in SIDE_BY_SIDE_HYPER:
        s = tcd_sample(g, model[0], pos[0], neg[0], lat[0], from_loader(model, "cfg", rel), steps, eta,
                       title=f"Hyper-SD, {steps} step{'s' if steps > 1 else ''}")
        panels.append(g.add("VAEDecode", samples=s[0], vae=ck[2]))
    while len(panels) > 1:  # stitched pairwise (a balanced tree), so every panel's chain has the same depth
        panels = [g.add("ImageStitch", image1=a[0], image2=b[0], direction="right", match_image_size=True,
                        spacing_width=16, spacing_color="white") for a, b in zip(panels[::2], panels[1::2])]
    g.add("SaveImage", images=panels[0][0], filename_prefix="HyperSD/sdxl_side_by_side")
    return dict(what=f"SDXL base at {base['steps']} steps beside the unified LoRA + TCD at 1 / 2 / 4 steps, same "
                     "seed, one image", family="SDXL", models=[BASE["SDXL"][0], rel.filename], steps="25 / 1 / 2 / 4",
                cfg=f"{base['cfg']:g} / {rel.cfg:g}", eta="- / " + " / ".join(f"{e:g}" for _, e in SIDE_BY_SIDE_HYPER),
                kind="side by side")
