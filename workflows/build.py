"""Definitions of every shipped Hyper-SD workflow; writes the UI files, API twins and docs table.

    python -m workflows.build            # rewrite example_workflows/*.json, workflows/api/*.json, docs + README tables
    python -m workflows.build --check    # exit 1 if any committed file differs

UI files go to example_workflows/ (ComfyUI 0.3.64 lists and serves them in the templates
browser); the API twins (for POST /prompt) go to workflows/api/, out of the browser's list.
"""
from __future__ import annotations

import argparse
import sys

from .graph import Graph
from .wfkit import API_DIR, REPO, UI_DIR, dump, load_schemas, ui_to_api, validate_api, write_atomic

HUB = "ByteDance/Hyper-SD"
BASE = {
    "SD15": ("v1-5-pruned-emaonly.safetensors", "stable-diffusion-v1-5/stable-diffusion-v1-5", 512),
    "SDXL": ("sd_xl_base_1.0.safetensors", "stabilityai/stable-diffusion-xl-base-1.0", 1024),
}
PROMPT = "a photo of a cat sitting on a wooden table, soft window light, highly detailed"
NEGATIVE = "blurry, low quality, deformed, watermark, text"
SEED = 42
WORKFLOWS: dict = {}


def workflow(fn):
    WORKFLOWS[fn.__name__] = fn
    return fn


def base_note(family: str) -> str:
    ckpt, hub, _ = BASE[family]
    return f"- models/checkpoints/{ckpt}  (hub: {hub})\n"


def lora_note(lora: str, strength: float = 1.0) -> str:
    return f"- models/loras/{lora}  (hub: {HUB}, file {lora}; strength {strength})\n"


def hyper_lora(g: Graph, model, lora: str):
    """The pack's loader with the official release picked: it uses the file from models/loras
    (downloading it when missing) and applies every key format."""
    return g.add("HyperSDLoraLoader", model=model, release=lora.removesuffix(".safetensors"), lora_name="None",
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


def tcd_sample(g: Graph, model, pos, neg, latent, steps: int, eta: float, denoise: float = 1.0):
    sampler = g.add("HyperSDTCDSampler", eta=eta)
    sigmas = g.add("HyperSDTCDScheduler", model=model, steps=steps, denoise=denoise)
    return g.add("SamplerCustom", model=model, add_noise=True, noise_seed=SEED, cfg=1.0, positive=pos[0],
                 negative=neg[0], sampler=sampler[0], sigmas=sigmas[0], latent_image=latent[0])


def nstep_lora(family: str, steps: int):
    def build(g: Graph):
        lora = f"Hyper-{family}-{steps}steps-lora.safetensors"
        g.note(base_note(family) + lora_note(lora) +
               f"\nN-step LoRA: DDIM trailing = euler + sgm_uniform, {steps} steps, cfg 1 (no negative prompt).")
        ck = checkpoint(g, family)
        model = hyper_lora(g, ck[0], lora)
        pos, neg = text(g, ck[1], PROMPT, "")
        lat = empty_latent(g, family)
        k = g.add("KSampler", model=model[0], seed=SEED, steps=steps, cfg=1.0, sampler_name="euler",
                  scheduler="sgm_uniform", positive=pos[0], negative=neg[0], latent_image=lat[0], denoise=1.0)
        decode_save(g, k[0], ck[2], f"{family.lower()}_{steps}step")
        return dict(what=f"{family} {steps}-step LoRA, KSampler euler + sgm_uniform", family=family,
                    models=[BASE[family][0], lora], steps=steps, cfg=1.0, eta=None)
    return build


def unified_tcd(family: str, steps: int, eta: float):
    def build(g: Graph):
        lora = f"Hyper-{family}-1step-lora.safetensors"
        g.note(base_note(family) + lora_note(lora) +
               f"\nUnified LoRA + TCD: {steps} step(s), eta {eta} (eta 1.0 at 1 step; lower eta keeps more "
               "detail at more steps), cfg 1.")
        ck = checkpoint(g, family)
        model = hyper_lora(g, ck[0], lora)
        pos, neg = text(g, ck[1], PROMPT, "")
        lat = empty_latent(g, family)
        s = tcd_sample(g, model[0], pos, neg, lat, steps, eta)
        decode_save(g, s[0], ck[2], f"{family.lower()}_unified_tcd_{steps}step")
        return dict(what=f"{family} unified LoRA, TCD sampler (SamplerCustom)", family=family,
                    models=[BASE[family][0], lora], steps=steps, cfg=1.0, eta=eta)
    return build


def cfg_lora(family: str, steps: int, cfg: float):
    def build(g: Graph):
        lora = f"Hyper-{family}-{steps}steps-CFG-lora.safetensors"
        g.note(base_note(family) + lora_note(lora) +
               f"\nCFG LoRA: {steps} steps, cfg {cfg} (5-8 works; cfg 1 gives bad images), negative prompt used.")
        ck = checkpoint(g, family)
        model = hyper_lora(g, ck[0], lora)
        pos, neg = text(g, ck[1], PROMPT, NEGATIVE)
        lat = empty_latent(g, family)
        k = g.add("KSampler", model=model[0], seed=SEED, steps=steps, cfg=cfg, sampler_name="euler",
                  scheduler="sgm_uniform", positive=pos[0], negative=neg[0], latent_image=lat[0], denoise=1.0)
        decode_save(g, k[0], ck[2], f"{family.lower()}_{steps}step_cfg")
        return dict(what=f"{family} {steps}-step CFG LoRA with negative prompt", family=family,
                    models=[BASE[family][0], lora], steps=steps, cfg=cfg, eta=None)
    return build


for _fam in ("SD15", "SDXL"):
    for _steps in (2, 4, 8):
        WORKFLOWS[f"hypersd_{_fam.lower()}_{_steps}step_lora"] = nstep_lora(_fam, _steps)
    WORKFLOWS[f"hypersd_{_fam.lower()}_unified_tcd_1step"] = unified_tcd(_fam, 1, 1.0)
    WORKFLOWS[f"hypersd_{_fam.lower()}_unified_tcd_4step"] = unified_tcd(_fam, 4, 0.3)
    WORKFLOWS[f"hypersd_{_fam.lower()}_8step_cfg_lora"] = cfg_lora(_fam, 8, 5.0)
    WORKFLOWS[f"hypersd_{_fam.lower()}_12step_cfg_lora"] = cfg_lora(_fam, 12, 5.0)


@workflow
def hypersd_sdxl_1step_unet(g: Graph):
    ckpt = "Hyper-SDXL-1step-Unet-Comfyui.fp16.safetensors"
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
                cfg=1.0, eta=None)


def controlnet_tcd(g: Graph, family: str, control: str, control_hub: str, steps: int, eta: float,
                   strength: float, scribble: bool, image: str):
    lora = f"Hyper-{family}-1step-lora.safetensors"
    kind = "scribble" if scribble else "canny"
    g.note(base_note(family) + lora_note(lora) +
           f"- models/controlnet/{control}  (hub: {control_hub})\n- input/{image}: your "
           f"{'drawing (either polarity) or photo' if scribble else 'photo'}\n"
           f"\n{kind} ControlNet (strength {strength}) + unified LoRA + TCD, {steps} step(s), eta {eta}, cfg 1.")
    ck = checkpoint(g, family)
    model = hyper_lora(g, ck[0], lora)
    pos, neg = text(g, ck[1], PROMPT, "")
    img = g.add("LoadImage", image=image)
    if scribble:
        hint = g.add("HyperSDScribblePreprocessor", image=img[0], source="drawing", polarity="auto",
                     threshold=0.5, dog_sigma=1.0, thickness=0)
    else:
        hint = g.add("Canny", image=img[0], low_threshold=0.4, high_threshold=0.8)
    cn = g.add("ControlNetLoader", control_net_name=control)
    applied = g.add("ControlNetApplyAdvanced", positive=pos[0], negative=neg[0], control_net=cn[0], image=hint[0],
                    strength=strength, start_percent=0.0, end_percent=1.0, vae=ck[2])
    lat = empty_latent(g, family)
    sampler = g.add("HyperSDTCDSampler", eta=eta)
    sigmas = g.add("HyperSDTCDScheduler", model=model[0], steps=steps, denoise=1.0)
    s = g.add("SamplerCustom", model=model[0], add_noise=True, noise_seed=SEED, cfg=1.0, positive=applied[0],
              negative=applied[1], sampler=sampler[0], sigmas=sigmas[0], latent_image=lat[0])
    decode_save(g, s[0], ck[2], f"{family.lower()}_{kind}_controlnet")
    return dict(what=f"{family} {kind} ControlNet (strength {strength}) + unified LoRA + TCD", family=family,
                models=[BASE[family][0], lora, control], steps=steps, cfg=1.0, eta=eta)


@workflow
def hypersd_sd15_scribble_controlnet_tcd_1step(g: Graph):
    return controlnet_tcd(g, "SD15", "control_v11p_sd15_scribble.safetensors",
                          "lllyasviel/ControlNet-v1-1 (control_v11p_sd15_scribble.pth) or lllyasviel/sd-controlnet-scribble",
                          1, 1.0, 1.0, True, "example.png")


@workflow
def hypersd_sd15_canny_controlnet_tcd_4step(g: Graph):
    return controlnet_tcd(g, "SD15", "control_v11p_sd15_canny.safetensors",
                          "lllyasviel/ControlNet-v1-1 (control_v11p_sd15_canny.pth)", 4, 0.3, 1.0, False, "example.png")


@workflow
def hypersd_sdxl_canny_controlnet_tcd_4step(g: Graph):
    return controlnet_tcd(g, "SDXL", "controlnet-canny-sdxl-1.0.safetensors",
                          "diffusers/controlnet-canny-sdxl-1.0 (diffusion_pytorch_model.safetensors, renamed)",
                          4, 0.3, 0.5, False, "example.png")


@workflow
def hypersd_sd15_img2img_tcd(g: Graph):
    lora = "Hyper-SD15-1step-lora.safetensors"
    g.note(base_note("SD15") + lora_note(lora) + "- input/example.png: the image to transform\n"
           "\nimg2img: unified LoRA + TCD, 4 steps at denoise 0.6 (TCD picks the timesteps below 0.6 T), "
           "eta 0.3, cfg 1.")
    ck = checkpoint(g, "SD15")
    model = hyper_lora(g, ck[0], lora)
    pos, neg = text(g, ck[1], PROMPT, "")
    img = g.add("LoadImage", image="example.png")
    lat = g.add("VAEEncode", pixels=img[0], vae=ck[2])
    s = tcd_sample(g, model[0], pos, neg, lat, 4, 0.3, denoise=0.6)
    decode_save(g, s[0], ck[2], "sd15_img2img_tcd")
    return dict(what="SD15 img2img, unified LoRA + TCD, denoise 0.6", family="SD15",
                models=[BASE["SD15"][0], lora], steps=4, cfg=1.0, eta=0.3)


@workflow
def hypersd_sd3_8step_cfg_lora(g: Graph):
    ckpt, lora = "sd3_medium_incl_clips_t5xxlfp16.safetensors", "Hyper-SD3-8steps-CFG-lora.safetensors"
    g.note(f"- models/checkpoints/{ckpt}  (hub: stabilityai/stable-diffusion-3-medium)\n" + lora_note(lora, 0.125) +
           "\nSD3 Hyper LoRA at scale 0.125 with ComfyUI's core LoRA loader (diffusers SD3 keys load "
           "fully in core), 8 steps, cfg 5.0 (4 steps: cfg 3.0; 16 steps: cfg 7.0), SD3 flow-matching "
           "default sampling (euler + simple).")
    ck = g.add("CheckpointLoaderSimple", ckpt_name=ckpt)
    model = g.add("LoraLoaderModelOnly", model=ck[0], lora_name=lora, strength_model=0.125)
    pos, neg = text(g, ck[1], PROMPT, NEGATIVE)
    lat = g.add("EmptySD3LatentImage", width=1024, height=1024, batch_size=1)
    k = g.add("KSampler", model=model[0], seed=SEED, steps=8, cfg=5.0, sampler_name="euler", scheduler="simple",
              positive=pos[0], negative=neg[0], latent_image=lat[0], denoise=1.0)
    decode_save(g, k[0], ck[2], "sd3_8step_cfg")
    return dict(what="SD3-medium 8-step CFG LoRA at scale 0.125", family="SD3", models=[ckpt, lora], steps=8,
                cfg=5.0, eta=None)


@workflow
def hypersd_flux_8step_lora(g: Graph):
    lora = "Hyper-FLUX.1-dev-8steps-lora.safetensors"
    g.note("- models/diffusion_models/flux1-dev.safetensors  (hub: black-forest-labs/FLUX.1-dev)\n"
           "- models/text_encoders/clip_l.safetensors, models/text_encoders/t5xxl_fp16.safetensors  "
           "(hub: comfyanonymous/flux_text_encoders)\n- models/vae/ae.safetensors  (hub: black-forest-labs/FLUX.1-dev)\n"
           + lora_note(lora, 0.125) +
           "\nFLUX.1-dev Hyper LoRA at scale 0.125, 8 steps (16-step LoRA: 16 steps), FluxGuidance 3.5, "
           "KSampler cfg 1 (the negative prompt is ignored at cfg 1), euler + simple.")
    unet = g.add("UNETLoader", unet_name="flux1-dev.safetensors", weight_dtype="default")
    clip = g.add("DualCLIPLoader", clip_name1="clip_l.safetensors", clip_name2="t5xxl_fp16.safetensors", type="flux",
                 device="default")
    vae = g.add("VAELoader", vae_name="ae.safetensors")
    model = g.add("LoraLoaderModelOnly", model=unet[0], lora_name=lora, strength_model=0.125)
    pos = g.add("CLIPTextEncode", "Positive prompt", text=PROMPT, clip=clip[0])
    guided = g.add("FluxGuidance", conditioning=pos[0], guidance=3.5)
    neg = g.add("ConditioningZeroOut", conditioning=pos[0])
    lat = g.add("EmptySD3LatentImage", width=1024, height=1024, batch_size=1)
    k = g.add("KSampler", model=model[0], seed=SEED, steps=8, cfg=1.0, sampler_name="euler", scheduler="simple",
              positive=guided[0], negative=neg[0], latent_image=lat[0], denoise=1.0)
    decode_save(g, k[0], vae[0], "flux_8step")
    return dict(what="FLUX.1-dev 8-step LoRA at scale 0.125, FluxGuidance 3.5", family="FLUX",
                models=["flux1-dev.safetensors", "clip_l.safetensors", "t5xxl_fp16.safetensors", "ae.safetensors", lora],
                steps=8, cfg=1.0, eta=None, guidance=3.5)


def build_all(schemas: dict) -> dict[str, tuple[dict, dict, dict]]:
    """name -> (ui, api, meta)."""
    out = {}
    for name, fn in sorted(WORKFLOWS.items()):
        g = Graph(schemas)
        meta = fn(g)
        ui = g.to_ui(extra={"hypersd": meta})
        api = ui_to_api(ui, schemas)
        problems = validate_api(api, schemas)
        if problems:
            raise ValueError(f"{name}: " + "; ".join(problems))
        out[name] = (ui, api, meta)
    return out


# Where each model file of the table comes from (the Notes inside the workflows say the same).
MODEL_HUB = {
    "v1-5-pruned-emaonly.safetensors": BASE["SD15"][1],
    "sd_xl_base_1.0.safetensors": BASE["SDXL"][1],
    "control_v11p_sd15_scribble.safetensors": "lllyasviel/ControlNet-v1-1",
    "control_v11p_sd15_canny.safetensors": "lllyasviel/ControlNet-v1-1",
    "controlnet-canny-sdxl-1.0.safetensors": "diffusers/controlnet-canny-sdxl-1.0",
    "sd3_medium_incl_clips_t5xxlfp16.safetensors": "stabilityai/stable-diffusion-3-medium",
    "flux1-dev.safetensors": "black-forest-labs/FLUX.1-dev",
    "ae.safetensors": "black-forest-labs/FLUX.1-dev",
    "clip_l.safetensors": "comfyanonymous/flux_text_encoders",
    "t5xxl_fp16.safetensors": "comfyanonymous/flux_text_encoders",
}


def model_hub(file: str) -> str:
    if file.startswith("Hyper-"):
        return HUB
    if file not in MODEL_HUB:
        raise KeyError(f"workflows.build.MODEL_HUB has no hub repo for {file!r}")
    return MODEL_HUB[file]


def docs_table(built: dict) -> str:
    rows = ["| file (example_workflows/) | what it does | model files (hub repo) | steps | cfg | eta |",
            "|---|---|---|---|---|---|"]
    for name, (_, _, m) in built.items():
        cfg = f"{m['cfg']:g}" + (f" (FluxGuidance {m['guidance']:g})" if m.get("guidance") else "")
        eta = "-" if m["eta"] is None else f"{m['eta']:g}"
        models = ", ".join(f"`{f}` ({model_hub(f)})" for f in m["models"])
        rows.append(f"| `{name}.json` | {m['what']} | {models} | {m['steps']} | {cfg} | {eta} |")
    return "\n".join(rows) + "\n"


DOCS = REPO / "docs" / "workflows.md"
README = REPO / "README.md"
TABLE_START, TABLE_END = "<!-- table -->\n", "<!-- /table -->"


def docs_with_table(built: dict, path=DOCS) -> str:
    """`path`'s text with the part between the table markers replaced by the current table."""
    text = path.read_text()
    if TABLE_START not in text:
        raise ValueError(f"{path} has no {TABLE_START.strip()} ... {TABLE_END} markers for the workflow table")
    head, rest = text.split(TABLE_START, 1)
    _, tail = rest.split(TABLE_END, 1)
    return head + TABLE_START + docs_table(built) + TABLE_END + tail


def expected_files(schemas: dict) -> dict:
    built = build_all(schemas)
    files = {doc: docs_with_table(built, doc) for doc in (DOCS, README)}
    for name, (ui, api, _) in built.items():
        files[UI_DIR / f"{name}.json"] = dump(ui)
        files[API_DIR / f"{name}.json"] = dump(api)
    return files, built


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only compare with the committed files")
    args = parser.parse_args(argv)
    files, built = expected_files(load_schemas())
    stale = [p for p, text in files.items() if not p.is_file() or p.read_text() != text]
    if args.check:
        for p in stale:
            print(f"stale: {p.relative_to(REPO)}")
        return 1 if stale else 0
    for p in stale:
        write_atomic(p, files[p])
    print(f"{len(built)} workflows, {len(stale)} files written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
