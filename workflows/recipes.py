"""Every shipped Hyper-SD workflow, defined once: ``WORKFLOWS`` maps a file name to its recipe.

A recipe adds nodes to a ``Graph`` and returns the metadata the docs table shows (``kind`` groups
the workflows for the README's pictures). Recommended settings come from ``releases.RELEASES`` (see
``blocks``) and, in the UI, from the loader's outputs wired into the samplers; what is chosen here
is only what a release does not fix: the 4-step TCD variants at eta 0.3, ControlNet strengths,
img2img denoise. The newer usages (inpainting, hires fix, 1-step img2img, side by side) are in
``usages.py``.
"""
from __future__ import annotations

from releases import ONE_STEP_UNET_COMFY, RELEASES, get_release

from .blocks import (BASE, HUB, MULTI_STEP_TCD, NEGATIVE, PROMPT, SEED, base_note, decode_save, empty_latent,
                     fixed_tcd_note, from_loader, ksampler, lora_note, lora_start, tcd_sample, text, wired_note)
from .graph import Graph
from .usages import USAGES

WORKFLOWS: dict = dict(USAGES)


def workflow(fn):
    WORKFLOWS[fn.__name__] = fn
    return fn


def step_lora(name: str):
    """N-step LoRA (cfg 1, no negative prompt) or CFG LoRA (negative prompt), through KSampler."""
    rel = get_release(name)
    uses_cfg = "CFG" in name

    def build(g: Graph):
        family, steps = rel.family, rel.steps
        if uses_cfg:
            how = (f"\nCFG LoRA: {steps} steps, cfg {rel.cfg} (5-8 works; cfg 1 gives bad images), "
                   "negative prompt used.")
            what, prefix = f"{family} {steps}-step CFG LoRA with negative prompt", f"{steps}step_cfg"
        else:
            how = (f"\nN-step LoRA: DDIM trailing = {rel.sampler} + {rel.scheduler}, {steps} steps, cfg {rel.cfg:g} "
                   "(no negative prompt).")
            what, prefix = f"{family} {steps}-step LoRA, KSampler {rel.sampler} + {rel.scheduler}", f"{steps}step"
        g.note(base_note(family) + lora_note(rel) + how + wired_note("steps", "cfg", "sampler_name", "scheduler"))
        ck, model, pos, neg = lora_start(g, family, rel, NEGATIVE if uses_cfg else "")
        k = ksampler(g, model[0], pos[0], neg[0], empty_latent(g, family)[0], rel, loader=model)
        decode_save(g, k[0], ck[2], f"{family.lower()}_{prefix}")
        return dict(what=what, family=family, models=[BASE[family][0], rel.filename], steps=steps, cfg=rel.cfg,
                    eta=None, kind="CFG LoRA" if uses_cfg else "N-step LoRA")
    return build


def unified_tcd(family: str, steps: int | None = None, eta: float | None = None):
    """The unified LoRA with the TCD sampler: the release's own steps and eta from the loader, or fixed ones."""
    rel = get_release(f"Hyper-{family}-1step-lora")
    fixed = steps is not None

    def build(g: Graph):
        shown_steps, shown_eta = (steps, eta) if fixed else (rel.steps, rel.eta)
        how = (fixed_tcd_note(steps, eta, rel) + wired_note("cfg") if fixed else
               wired_note("steps", "eta", "cfg"))
        g.note(base_note(family) + lora_note(rel) +
               f"\nUnified LoRA + TCD: {shown_steps} step(s), eta {shown_eta} (eta {rel.eta} at 1 step; lower eta "
               f"keeps more detail at more steps), cfg {rel.cfg:g}." + how)
        ck, model, pos, neg = lora_start(g, family, rel)
        s = tcd_sample(g, model[0], pos[0], neg[0], empty_latent(g, family)[0], from_loader(model, "cfg", rel),
                       steps if fixed else from_loader(model, "steps", rel),
                       eta if fixed else from_loader(model, "eta", rel))
        decode_save(g, s[0], ck[2], f"{family.lower()}_unified_tcd_{shown_steps}step")
        return dict(what=f"{family} unified LoRA, TCD sampler (SamplerCustom)", family=family,
                    models=[BASE[family][0], rel.filename], steps=shown_steps, cfg=rel.cfg, eta=shown_eta,
                    kind="unified LoRA + TCD")
    return build


for _rel in RELEASES:
    if _rel.family in ("SD15", "SDXL") and _rel.sampler != "tcd":
        _cfg = "_cfg" if "CFG" in _rel.name else ""
        WORKFLOWS[f"hypersd_{_rel.family.lower()}_{_rel.steps}step{_cfg}_lora"] = step_lora(_rel.name)
for _fam in ("SD15", "SDXL"):
    WORKFLOWS[f"hypersd_{_fam.lower()}_unified_tcd_1step"] = unified_tcd(_fam)
    WORKFLOWS[f"hypersd_{_fam.lower()}_unified_tcd_4step"] = unified_tcd(_fam, *MULTI_STEP_TCD)


@workflow
def hypersd_sdxl_1step_unet(g: Graph):
    ckpt = ONE_STEP_UNET_COMFY
    g.note(f"- models/checkpoints/{ckpt}  (hub: {HUB}, file {ckpt}: full SDXL checkpoint with the 1-step UNet)\n"
           "\n1 step at timestep 800 (sigma 5.111) with unit-variance start noise, as diffusers' "
           "LCMScheduler(timesteps=[800]); cfg 1. No LoRA.")
    ck = g.add("CheckpointLoaderSimple", ckpt_name=ckpt)
    pos, neg = text(g, ck[1], PROMPT, "")
    lat = empty_latent(g, "SDXL")
    sampler = g.add("HyperSDOneStepSampler", unit_variance_noise=True)
    sigmas = g.add("HyperSDOneStepScheduler", model=ck[0], timestep=800)
    s = g.add("SamplerCustom", model=ck[0], add_noise=True, noise_seed=SEED, cfg=1.0, positive=pos[0],
              negative=neg[0], sampler=sampler[0], sigmas=sigmas[0], latent_image=lat[0])
    decode_save(g, s[0], ck[2], "sdxl_1step_unet")
    return dict(what="SDXL 1-step UNet checkpoint at timestep 800", family="SDXL", models=[ckpt], steps=1,
                cfg=1.0, eta=None, kind="1-step UNet")


def controlnet_tcd(g: Graph, family: str, control: str, control_hub: str, steps: int, eta: float,
                   strength: float, scribble: bool, image: str):
    """ControlNet + unified LoRA + TCD; at the release's 1 step the loader's steps and eta are wired."""
    rel = get_release(f"Hyper-{family}-1step-lora")
    kind = "scribble" if scribble else "canny"
    wired = steps == rel.steps and eta == rel.eta
    g.note(base_note(family) + lora_note(rel) +
           f"- models/controlnet/{control}  (hub: {control_hub})\n- input/{image}: your "
           f"{'drawing (either polarity) or photo' if scribble else 'photo'}\n"
           f"\n{kind} ControlNet (strength {strength}) + unified LoRA + TCD, {steps} step(s), eta {eta}, "
           f"cfg {rel.cfg:g}." + (wired_note("steps", "eta", "cfg") if wired else
                                  fixed_tcd_note(steps, eta, rel) + wired_note("cfg")))
    ck, model, pos, neg = lora_start(g, family, rel)
    img = g.add("LoadImage", image=image)
    if scribble:
        hint = g.add("HyperSDScribblePreprocessor", image=img[0], source="drawing", polarity="auto",
                     threshold=0.5, dog_sigma=1.0, thickness=0)
    else:
        hint = g.add("Canny", image=img[0], low_threshold=0.4, high_threshold=0.8)
    cn = g.add("ControlNetLoader", control_net_name=control)
    applied = g.add("ControlNetApplyAdvanced", positive=pos[0], negative=neg[0], control_net=cn[0], image=hint[0],
                    strength=strength, start_percent=0.0, end_percent=1.0, vae=ck[2])
    s = tcd_sample(g, model[0], applied[0], applied[1], empty_latent(g, family)[0], from_loader(model, "cfg", rel),
                   from_loader(model, "steps", rel) if wired else steps,
                   from_loader(model, "eta", rel) if wired else eta)
    decode_save(g, s[0], ck[2], f"{family.lower()}_{kind}_controlnet")
    return dict(what=f"{family} {kind} ControlNet (strength {strength}) + unified LoRA + TCD", family=family,
                models=[BASE[family][0], rel.filename, control], steps=steps, cfg=rel.cfg, eta=eta,
                kind="ControlNet")


@workflow
def hypersd_sd15_scribble_controlnet_tcd_1step(g: Graph):
    rel = get_release("Hyper-SD15-1step-lora")
    return controlnet_tcd(g, "SD15", "control_v11p_sd15_scribble.safetensors",
                          "lllyasviel/ControlNet-v1-1 (control_v11p_sd15_scribble.pth) or lllyasviel/sd-controlnet-scribble",
                          rel.steps, rel.eta, 1.0, True, "example.png")


@workflow
def hypersd_sd15_canny_controlnet_tcd_4step(g: Graph):
    return controlnet_tcd(g, "SD15", "control_v11p_sd15_canny.safetensors",
                          "lllyasviel/ControlNet-v1-1 (control_v11p_sd15_canny.pth)", *MULTI_STEP_TCD, 1.0, False,
                          "example.png")


@workflow
def hypersd_sdxl_canny_controlnet_tcd_4step(g: Graph):
    return controlnet_tcd(g, "SDXL", "controlnet-canny-sdxl-1.0.safetensors",
                          "diffusers/controlnet-canny-sdxl-1.0 (diffusion_pytorch_model.safetensors, renamed)",
                          *MULTI_STEP_TCD, 0.5, False, "example.png")


@workflow
def hypersd_sd15_img2img_tcd(g: Graph):
    rel, (steps, eta) = get_release("Hyper-SD15-1step-lora"), MULTI_STEP_TCD
    g.note(base_note("SD15") + lora_note(rel) + "- input/example.png: the image to transform\n"
           f"\nimg2img: unified LoRA + TCD, {steps} steps at denoise 0.6 (TCD picks the timesteps below 0.6 T), "
           f"eta {eta}, cfg {rel.cfg:g}." + fixed_tcd_note(steps, eta, rel) + wired_note("cfg"))
    ck, model, pos, neg = lora_start(g, "SD15", rel)
    img = g.add("LoadImage", image="example.png")
    lat = g.add("VAEEncode", pixels=img[0], vae=ck[2])
    s = tcd_sample(g, model[0], pos[0], neg[0], lat[0], from_loader(model, "cfg", rel), steps, eta, denoise=0.6)
    decode_save(g, s[0], ck[2], "sd15_img2img_tcd")
    return dict(what="SD15 img2img, unified LoRA + TCD, denoise 0.6", family="SD15",
                models=[BASE["SD15"][0], rel.filename], steps=steps, cfg=rel.cfg, eta=eta, kind="img2img")


def _other_sizes(rel) -> list:
    return [r for r in RELEASES if r.family == rel.family and r is not rel]


@workflow
def hypersd_sd3_8step_cfg_lora(g: Graph):
    ckpt, rel = "sd3_medium_incl_clips_t5xxlfp16.safetensors", get_release("Hyper-SD3-8steps-CFG-lora")
    others = "; ".join(f"{r.steps} steps: cfg {r.cfg}" for r in _other_sizes(rel))
    g.note(f"- models/checkpoints/{ckpt}  (hub: stabilityai/stable-diffusion-3-medium)\n" + lora_note(rel) +
           f"\nSD3 Hyper LoRA at scale {rel.strength} with ComfyUI's core LoRA loader (diffusers SD3 keys load "
           f"fully in core), {rel.steps} steps, cfg {rel.cfg} ({others}), SD3 flow-matching "
           f"default sampling ({rel.sampler} + {rel.scheduler}).")
    ck = g.add("CheckpointLoaderSimple", ckpt_name=ckpt)
    model = g.add("LoraLoaderModelOnly", model=ck[0], lora_name=rel.filename, strength_model=rel.strength)
    pos, neg = text(g, ck[1], PROMPT, NEGATIVE)
    lat = g.add("EmptySD3LatentImage", width=1024, height=1024, batch_size=1)
    k = ksampler(g, model[0], pos[0], neg[0], lat[0], rel)
    decode_save(g, k[0], ck[2], "sd3_8step_cfg")
    return dict(what=f"SD3-medium {rel.steps}-step CFG LoRA at scale {rel.strength}", family="SD3",
                models=[ckpt, rel.filename], steps=rel.steps, cfg=rel.cfg, eta=None, kind="SD3")


@workflow
def hypersd_flux_8step_lora(g: Graph):
    rel = get_release("Hyper-FLUX.1-dev-8steps-lora")
    others = ", ".join(f"{r.steps}-step LoRA: {r.steps} steps" for r in _other_sizes(rel))
    g.note("- models/diffusion_models/flux1-dev.safetensors  (hub: black-forest-labs/FLUX.1-dev)\n"
           "- models/text_encoders/clip_l.safetensors, models/text_encoders/t5xxl_fp16.safetensors  "
           "(hub: comfyanonymous/flux_text_encoders)\n- models/vae/ae.safetensors  (hub: black-forest-labs/FLUX.1-dev)\n"
           + lora_note(rel) +
           f"\nFLUX.1-dev Hyper LoRA at scale {rel.strength}, {rel.steps} steps ({others}), FluxGuidance "
           f"{rel.guidance}, KSampler cfg {rel.cfg:g} (the negative prompt is ignored at cfg 1), "
           f"{rel.sampler} + {rel.scheduler}.")
    unet = g.add("UNETLoader", unet_name="flux1-dev.safetensors", weight_dtype="default")
    clip = g.add("DualCLIPLoader", clip_name1="clip_l.safetensors", clip_name2="t5xxl_fp16.safetensors", type="flux",
                 device="default")
    vae = g.add("VAELoader", vae_name="ae.safetensors")
    model = g.add("LoraLoaderModelOnly", model=unet[0], lora_name=rel.filename, strength_model=rel.strength)
    pos = g.add("CLIPTextEncode", "Positive prompt", text=PROMPT, clip=clip[0])
    guided = g.add("FluxGuidance", conditioning=pos[0], guidance=rel.guidance)
    neg = g.add("ConditioningZeroOut", conditioning=pos[0])
    lat = g.add("EmptySD3LatentImage", width=1024, height=1024, batch_size=1)
    k = ksampler(g, model[0], guided[0], neg[0], lat[0], rel)
    decode_save(g, k[0], vae[0], "flux_8step")
    return dict(what=f"FLUX.1-dev {rel.steps}-step LoRA at scale {rel.strength}, FluxGuidance {rel.guidance}",
                family="FLUX",
                models=["flux1-dev.safetensors", "clip_l.safetensors", "t5xxl_fp16.safetensors", "ae.safetensors",
                        rel.filename],
                steps=rel.steps, cfg=rel.cfg, eta=None, guidance=rel.guidance, kind="FLUX")
