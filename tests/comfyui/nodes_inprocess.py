"""In-process checks of the Hyper-SD nodes inside real ComfyUI (run with ComfyUI's python).

    COMFYUI_PATH=/work/ComfyUI $COMFYUI_PYTHON tests/comfyui/nodes_inprocess.py OUT.json

Loads the pack through ComfyUI's own custom-node loader, builds a tiny SD1.5-shaped UNet with
ComfyUI's UNetModel (random weights, detected by ComfyUI as SD15), runs the core SamplerCustom and
KSampler nodes with the pack's samplers, and compares against references written here in VP space
from the reference doc's formulas (not through schedulers/). LoRAs: UNet LoRAs on the tiny UNets,
and text-encoder LoRAs on full-size random-weight CLIPs built by ComfyUI's own text-encoder loader
(SD1.5: CLIP-L; SDXL: CLIP-L + CLIP-G), patched weights read back as ComfyUI runs them. Prints
nothing but writes a JSON report that tests/comfyui/test_nodes_comfyui.py asserts on.
"""
import asyncio
import json
import logging
import math
import os
import sys
import tempfile
import time

COMFY = os.environ["COMFYUI_PATH"]
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, COMFY)
sys.argv = [sys.argv[0], "--cpu"]
OUT = os.environ["HYPERSD_CHECK_OUT"]

import comfy.options  # noqa: E402

comfy.options.enable_args_parsing()
import torch  # noqa: E402

import comfy.lora  # noqa: E402
import comfy.model_management  # noqa: E402
import comfy.ops  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.utils  # noqa: E402
import folder_paths  # noqa: E402
import nodes  # noqa: E402
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel  # noqa: E402

results: dict = {}


class LogCount(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


LOG = LogCount()
logging.getLogger().addHandler(LOG)
logging.getLogger().setLevel(logging.INFO)

TINY_SD15 = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[1],
                 channel_mult=[1], transformer_depth=[1], transformer_depth_output=[1, 1], transformer_depth_middle=1,
                 num_head_channels=-1, num_heads=8, context_dim=768, use_linear_in_transformer=False,
                 use_spatial_transformer=True, legacy=False, adm_in_channels=None)


def tiny_sd15_state_dict(seed=0):
    torch.manual_seed(seed)
    m = UNetModel(**TINY_SD15, dtype=torch.float32, device="cpu", operations=comfy.ops.disable_weight_init)
    return {k: (torch.randn_like(v) * 0.05 if v.is_floating_point() else v) for k, v in m.state_dict().items()}


def load_model(sd):
    return comfy.sd.load_diffusion_model_state_dict(dict(sd))


def setup_pack(tmp):
    custom = os.path.join(tmp, "custom_nodes")
    os.makedirs(custom)
    link = os.path.join(custom, "comfyui_hyper_sd")
    os.symlink(REPO, link)
    loras = os.path.join(tmp, "loras")
    os.makedirs(loras)
    folder_paths.add_model_folder_path("loras", loras, is_default=True)
    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    before = set(sys.modules)
    t0 = time.perf_counter()
    ok = asyncio.run(nodes.load_custom_node(link, set(nodes.NODE_CLASS_MAPPINGS), module_parent="custom_nodes"))
    results["import_ok"] = ok
    results["import_seconds"] = time.perf_counter() - t0
    new = {m.split(".")[0] for m in set(sys.modules) - before}
    results["heavy_modules_imported_by_pack"] = sorted(new & {"diffusers", "peft", "accelerate", "transformers",
                                                               "huggingface_hub"})
    results["nodes"] = sorted(k for k in nodes.NODE_CLASS_MAPPINGS if k.startswith("HyperSD"))
    import comfy.samplers as cs

    results["tcd_in_lists"] = ["tcd" in cs.KSampler.SAMPLERS, "tcd" in cs.KSampler.SCHEDULERS,
                               "tcd" in cs.SAMPLER_NAMES, "tcd" in cs.SCHEDULER_NAMES]
    return loras


# -- references in VP space (reference doc formulas), independent of schedulers/ ---------------------

def abar_table():
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


def unet_eps(model, x_vp, t, context):
    dm = model.model.diffusion_model
    with torch.no_grad():
        return dm(x_vp.float(), torch.tensor([float(t)]), context=context.float()).double()


TCD_T = {1: [999], 2: [999, 499], 4: [999, 759, 499, 259]}


def reference_tcd(model, noise, context, steps, eta, seed):
    abar = abar_table()
    gen = torch.Generator().manual_seed(seed)
    x = noise.double()  # t = 999 = sigma_max: ComfyUI starts from unit-variance noise too
    ts = TCD_T[steps]
    for i, t in enumerate(ts):
        t_prev = ts[i + 1] if i + 1 < len(ts) else 0
        eps = unet_eps(model, x, t, context)
        x0 = (x - (1 - abar[t]).sqrt() * eps) / abar[t].sqrt()
        s = math.floor((1 - eta) * t_prev)
        x = abar[s].sqrt() * x0 + (1 - abar[s]).sqrt() * eps
        if i + 1 < len(ts):
            z = torch.randn(noise.shape, generator=gen, dtype=torch.float32).double()
            ratio = abar[t_prev] / abar[s]
            x = ratio.sqrt() * x + (1 - ratio).sqrt() * z
    return x


def reference_one_step(model, noise, context, t=800):
    abar = abar_table()
    x = noise.double()  # diffusers: unit-variance UNet input
    eps = unet_eps(model, x, t, context)
    x0 = (x - (1 - abar[t]).sqrt() * eps) / abar[t].sqrt()
    scaled = t * 10.0
    c_skip = 0.25 / (scaled ** 2 + 0.25)
    c_out = scaled / math.sqrt(scaled ** 2 + 0.25)
    return c_out * x0 + c_skip * x


def rel_err(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def sampling_checks(model):
    M = nodes.NODE_CLASS_MAPPINGS
    seed = 1234
    torch.manual_seed(7)
    context = torch.randn(1, 77, 768)
    positive = [[context, {}]]
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    noise = torch.randn(1, 4, 8, 8, generator=torch.manual_seed(seed))
    scale = 0.18215  # SD1.5 latent format: ComfyUI returns latents / scale_factor
    out = {}
    for steps in (1, 4):
        eta = 1.0 if steps == 1 else 0.3
        sampler = M["HyperSDTCDSampler"].execute(eta=eta).result[0]
        sigmas = M["HyperSDTCDScheduler"].execute(model=model, steps=steps, denoise=1.0).result[0]
        got = M["SamplerCustom"]().sample(model, True, seed, 1.0, positive, positive, sampler, sigmas, latent)[0]["samples"]
        ref = reference_tcd(model, noise, context, steps, eta, seed) / scale
        out[f"samplercustom_tcd_{steps}step_rel_err"] = rel_err(got, ref)
        out[f"tcd_{steps}step_sigmas"] = [round(float(s), 4) for s in sigmas]
    got = M["KSampler"]().sample(model, seed, 4, 1.0, "tcd", "tcd", positive, positive, latent)[0]["samples"]
    out["ksampler_tcd_4step_rel_err"] = rel_err(got, reference_tcd(model, noise, context, 4, 0.3, seed) / scale)
    got = M["KSampler"]().sample(model, seed, 1, 1.0, "tcd", "tcd", positive, positive, latent)[0]["samples"]
    out["ksampler_tcd_1step_rel_err"] = rel_err(got, reference_tcd(model, noise, context, 1, 0.3, seed) / scale)
    sigmas = M["HyperSDOneStepScheduler"].execute(model=model, timestep=800).result[0]
    out["one_step_sigmas"] = [round(float(s), 4) for s in sigmas]
    sampler = M["HyperSDOneStepSampler"].execute(unit_variance_noise=True).result[0]
    got = M["SamplerCustom"]().sample(model, True, seed, 1.0, positive, positive, sampler, sigmas, latent)[0]["samples"]
    out["one_step_rel_err"] = rel_err(got, reference_one_step(model, noise, context) / scale)
    # ComfyUI's own scaling (sigma * noise) would differ: make sure the check can fail.
    out["one_step_vs_sigma_scaled_noise_rel_err"] = rel_err(
        got, reference_one_step(model, noise * float(sigmas[0]) / math.sqrt(1 + float(sigmas[0]) ** 2), context) / scale)
    results.update(out)


# -- LoRA files from the model's real diffusers names -----------------------------------------------

def diffusers_to_comfy(model):
    """diffusers module path -> ComfyUI weight key, from ComfyUI's own mapping."""
    mapping = comfy.utils.unet_to_diffusers(model.model.model_config.unet_config)
    return {d[: -len(".weight")]: "diffusion_model." + c for d, c in mapping.items() if d.endswith(".weight")}


def lora_weights_for(model, targets, rank=4, seed=0):
    """diffusers path -> (down, up) for the model's modules ending in one of ``targets``."""
    shapes = {k: tuple(v.shape) for k, v in model.model.state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    out = {}
    for path, ckey in sorted(diffusers_to_comfy(model).items()):
        if not any(path.endswith(t) for t in targets) or ckey not in shapes:
            continue  # ComfyUI's mapping also lists blocks this tiny model does not have
        shape = shapes[ckey]
        kernel = shape[2:]
        down = torch.randn((rank, shape[1], *kernel), generator=g) * 0.1
        up = torch.randn((shape[0], rank, *((1,) * len(kernel))), generator=g) * 0.1
        out[path] = (down, up)
    return out


def lora_file(weights, fmt, alpha):
    sd = {}
    for path, (down, up) in weights.items():
        if fmt == "kohya":
            name = "lora_unet_" + path.replace(".", "_")
            sd[name + ".lora_up.weight"], sd[name + ".lora_down.weight"] = up, down
            sd[name + ".alpha"] = torch.tensor(alpha)
        elif fmt == "peft":
            sd[f"unet.{path}.lora_B.weight"], sd[f"unet.{path}.lora_A.weight"] = up, down
        elif fmt == "peft_base_model":
            sd[f"base_model.model.{path}.lora_B.weight"], sd[f"base_model.model.{path}.lora_A.weight"] = up, down
        elif fmt == "diffusers_old":  # attention processors only
            block, _, proj = path.rpartition(".")
            proj = {"0": "to_out"}.get(proj, proj)
            block = block[: -len(".to_out")] if proj == "to_out" else block
            sd[f"unet.{block}.processor.{proj}_lora.up.weight"] = up
            sd[f"unet.{block}.processor.{proj}_lora.down.weight"] = down
    return sd


def expected_deltas(model, weights, scale):
    to_comfy = diffusers_to_comfy(model)
    shapes = {k: v.shape for k, v in model.model.state_dict().items()}
    return {to_comfy[p]: (up.flatten(1) @ down.flatten(1)).reshape(shapes[to_comfy[p]]) * scale
            for p, (down, up) in weights.items()}


def patched_weights(model_patcher, keys):
    """Weights as ComfyUI runs them: load the patcher the way sampling does, read, unload."""
    comfy.model_management.load_models_gpu([model_patcher], force_full_load=True)
    try:
        sd = model_patcher.model.state_dict()
        return {k: sd[k].detach().clone() for k in keys}
    finally:
        comfy.model_management.unload_all_models()


ALL_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2", "conv1")
ATTN_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def lora_checks(model, loras_dir, tag, formats):
    from safetensors.torch import save_file

    M = nodes.NODE_CLASS_MAPPINGS
    base = {k: v.detach().clone() for k, v in model.model.state_dict().items()}
    rank, alpha, strength = 4, 2.0, 0.7
    for fmt in formats:
        weights = lora_weights_for(model, ATTN_TARGETS if fmt == "diffusers_old" else ALL_TARGETS, rank)
        deltas = expected_deltas(model, weights, alpha / rank if fmt == "kohya" else 1.0)
        name = f"tiny_{tag}_{fmt}.safetensors"
        save_file(lora_file(weights, fmt, alpha), os.path.join(loras_dir, name))
        LOG.messages.clear()
        out = M["HyperSDLoraLoader"].execute(model=model, release="none (use lora_name)", lora_name=name,
                                             strength_model=strength, strength_clip=1.0, download_missing=False)
        new_model, info = out.result[0], out.result[7]
        not_loaded = sum("lora key not loaded" in m for m in LOG.messages)
        got = patched_weights(new_model, list(deltas))
        err = max(float((got[k] - (base[k] + strength * deltas[k])).abs().max()) for k in deltas)
        changed = sum(not torch.equal(got[k], base[k]) for k in deltas)
        results[f"lora_{tag}_{fmt}"] = {"info": info, "lora_key_not_loaded": not_loaded, "max_abs_err": err,
                                        "changed_weights": changed, "expected_changed": len(deltas),
                                        "outputs": [out.result[i] for i in (2, 3, 4, 5, 6)]}
        if fmt == "peft":  # ComfyUI's own loader on the raw PEFT file, for contrast
            LOG.messages.clear()
            comfy.sd.load_lora_for_models(model, None, lora_file(weights, fmt, alpha), 1.0, 1.0)
            results[f"core_loader_{tag}_peft_not_loaded"] = sum("lora key not loaded" in m for m in LOG.messages)
    if tag == "sd15":
        release_checks(model, loras_dir)
    now = model.model.state_dict()
    results[f"base_model_unchanged_{tag}"] = all(torch.equal(now[k], base[k]) for k in base)


# -- text-encoder LoRAs on a real ComfyUI CLIP ---------------------------------------------------------

TE_ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj")
TE_MLP = ("mlp.fc1", "mlp.fc2")
# ComfyUI encoder -> layers a LoRA targets (first, a middle one, last).
TE_LAYERS = {"sd15": {"clip_l": (0, 5, 11)}, "sdxl": {"clip_l": (0, 11), "clip_g": (0, 17, 31)}}
# Per format: file prefix for each encoder, whether an alpha is written, whether MLPs are targeted.
TE_FORMATS = {
    "sd15": {"kohya_te": ({"clip_l": "lora_te_"}, True, True),
             "kohya_te1": ({"clip_l": "lora_te1_"}, True, True),
             "peft": ({"clip_l": "text_encoder."}, False, True),
             "peft_base_model": ({"clip_l": "base_model.model."}, False, True),
             "diffusers": ({"clip_l": "text_encoder."}, True, True),
             "diffusers_lora": ({"clip_l": "text_encoder."}, False, True),
             "diffusers_old": ({"clip_l": "text_encoder."}, False, False)},
    "sdxl": {"kohya": ({"clip_l": "lora_te1_", "clip_g": "lora_te2_"}, True, True),
             "peft": ({"clip_l": "text_encoder.", "clip_g": "text_encoder_2."}, False, True),
             "diffusers": ({"clip_l": "text_encoder.", "clip_g": "text_encoder_2."}, True, True),
             "diffusers_old": ({"clip_l": "text_encoder.", "clip_g": "text_encoder_2."}, False, False)},
}
TE_OLD_NAMES = {"self_attn.q_proj": "self_attn.to_q", "self_attn.k_proj": "self_attn.to_k",
                "self_attn.v_proj": "self_attn.to_v", "self_attn.out_proj": "self_attn.to_out"}


def load_clip(tag, seed=0):
    """A float32 CLIP the way CLIPLoader / DualCLIPLoader build one: random-weight HF CLIP-L (and
    open_clip CLIP-G for SDXL) state dicts through comfy.sd.load_text_encoder_state_dicts."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import tiny_checkpoints as tc

    sds = [tc.random_weights(tc.clip_l_shapes("text_model."), seed, dtype=torch.float32)]
    if tag == "sdxl":
        sds.append(tc.random_weights(tc.open_clip_g_shapes(""), seed + 1, dtype=torch.float32))
    LOG.messages.clear()
    clip = comfy.sd.load_text_encoder_state_dicts(sds, clip_type=comfy.sd.CLIPType.STABLE_DIFFUSION,
                                                  model_options={"dtype": torch.float32})
    results[f"te_{tag}_clip_missing_logged"] = [m for m in LOG.messages if m.startswith("clip missing")]
    return clip


def te_targets(tag, mlp=True):
    """(ComfyUI encoder, HF module path) for every module a TE LoRA of ``tag`` targets."""
    mods = TE_ATTN + (TE_MLP if mlp else ())
    return [(enc, f"text_model.encoder.layers.{i}.{m}") for enc, layers in TE_LAYERS[tag].items()
            for i in layers for m in mods]


def te_weight_key(enc, path):
    return f"{enc}.transformer.{path}.weight"


def te_lora_file(weights, prefixes, fmt, alpha):
    sd = {}
    for (enc, path), (down, up) in weights.items():
        prefix = prefixes[enc]
        if fmt.startswith("kohya"):
            name = prefix + path.replace(".", "_")
            sd[name + ".lora_up.weight"], sd[name + ".lora_down.weight"] = up, down
        elif fmt.startswith("peft"):
            name = prefix + path
            sd[name + ".lora_B.weight"], sd[name + ".lora_A.weight"] = up, down
        elif fmt == "diffusers":
            name = prefix + path
            sd[name + ".lora_linear_layer.up.weight"], sd[name + ".lora_linear_layer.down.weight"] = up, down
        elif fmt == "diffusers_lora":
            name = prefix + path
            sd[name + ".lora.up.weight"], sd[name + ".lora.down.weight"] = up, down
        elif fmt == "diffusers_old":  # attention-processor names: self_attn.to_q_lora.down.weight
            head, _, mod = path.rpartition(".self_attn.")
            name = prefix + head + "." + TE_OLD_NAMES["self_attn." + mod]
            sd[name + "_lora.up.weight"], sd[name + "_lora.down.weight"] = up, down
        if alpha is not None:
            sd[name + ".alpha"] = torch.tensor(alpha)
    return sd


def load_safetensors(path):
    from safetensors.torch import load_file

    return load_file(path)


def fingerprints(module):
    import hashlib

    return {k: hashlib.sha1(memoryview(v.detach().contiguous().cpu().reshape(-1).numpy()).cast("B")).hexdigest()
            for k, v in module.state_dict().items()}


def te_checks(model, loras_dir, tag):
    """Text-encoder LoRAs in every claimed format, applied by the node to a real ComfyUI CLIP."""
    from safetensors.torch import save_file

    M = nodes.NODE_CLASS_MAPPINGS
    t0 = time.perf_counter()
    clip = load_clip(tag)
    results[f"te_{tag}_clip_class"] = type(clip.cond_stage_model).__name__
    results[f"te_{tag}_clip_load_seconds"] = time.perf_counter() - t0
    clip_sd = clip.cond_stage_model.state_dict()
    results[f"te_{tag}_clip_dtypes"] = sorted({str(v.dtype) for v in clip_sd.values()})
    base_fp = fingerprints(clip.cond_stage_model)
    rank, alpha, strength = 4, 2.0, 0.6
    g = torch.Generator().manual_seed(1)
    for fmt, (prefixes, with_alpha, mlp) in TE_FORMATS[tag].items():
        weights = {}
        for enc, path in te_targets(tag, mlp):
            out_f, in_f = clip_sd[te_weight_key(enc, path)].shape
            weights[(enc, path)] = (torch.randn(rank, in_f, generator=g) * 0.1, torch.randn(out_f, rank, generator=g) * 0.1)
        scale = alpha / rank if with_alpha else 1.0
        expected = {te_weight_key(enc, path): clip_sd[te_weight_key(enc, path)].double()
                    + strength * scale * (up.double() @ down.double())
                    for (enc, path), (down, up) in weights.items()}
        lora = te_lora_file(weights, prefixes, fmt, alpha if with_alpha else None)
        name = f"te_{tag}_{fmt}.safetensors"
        save_file(lora, os.path.join(loras_dir, name))
        LOG.messages.clear()
        out = M["HyperSDLoraLoader"].execute(model=model, release="none (use lora_name)", lora_name=name,
                                             strength_model=1.0, strength_clip=strength, download_missing=False,
                                             clip=clip)
        new_model, new_clip, info = out.result[0], out.result[1], out.result[7]
        not_loaded = sum("lora key not loaded" in m or "NOT LOADED" in m for m in LOG.messages)
        comfy.model_management.load_models_gpu([new_clip.patcher], force_full_load=True)
        try:
            got = new_clip.cond_stage_model.state_dict()
            err = max(float((got[k].double() - expected[k]).abs().max()) for k in expected)
            changed = sorted(k for k, h in fingerprints(new_clip.cond_stage_model).items() if h != base_fp[k])
        finally:
            comfy.model_management.unload_all_models()
        encoders = {}
        for k in changed:
            encoders[k.split(".")[0]] = encoders.get(k.split(".")[0], 0) + 1
        r = {"info": info, "lora_key_not_loaded": not_loaded, "max_abs_err": err, "tensors": len(lora),
             "changed_weights": len(changed), "expected_changed": len(expected),
             "changed_is_expected": changed == sorted(expected), "changed_per_encoder": encoders,
             "clip_patches": len(new_clip.patcher.patches), "model_patches": len(new_model.patches),
             "max_abs_delta": max(float((expected[k] - clip_sd[k].double()).abs().max()) for k in expected)}
        # ComfyUI's own loader on the same file, for contrast.
        LOG.messages.clear()
        _, core_clip = comfy.sd.load_lora_for_models(model, clip, dict(lora), 1.0, strength)
        r["core_not_loaded"] = sum("lora key not loaded" in m for m in LOG.messages)
        r["core_clip_patches"] = len(core_clip.patcher.patches)
        results[f"te_{tag}_{fmt}"] = r
    if tag == "sd15":  # one file with UNet (kohya) and text-encoder (PEFT) LoRAs, with and without CLIP
        unet = lora_file(lora_weights_for(model, ATTN_TARGETS), "kohya", alpha)
        te = load_safetensors(os.path.join(loras_dir, "te_sd15_peft.safetensors"))
        save_file({**unet, **te}, os.path.join(loras_dir, "mixed_sd15.safetensors"))
        mixed = {"unet_tensors": len(unet), "te_tensors": len(te)}
        for label, c in (("with_clip", clip), ("no_clip", None)):
            LOG.messages.clear()
            out = M["HyperSDLoraLoader"].execute(model=model, release="none (use lora_name)",
                                                 lora_name="mixed_sd15.safetensors", strength_model=1.0,
                                                 strength_clip=strength, download_missing=False, clip=c)
            mixed[label] = {"info": out.result[7], "model_patches": len(out.result[0].patches),
                            "clip_patches": None if out.result[1] is None else len(out.result[1].patcher.patches),
                            "lora_key_not_loaded": sum("lora key not loaded" in m for m in LOG.messages)}
        results["te_sd15_mixed"] = mixed
    results[f"te_{tag}_base_clip_unchanged"] = fingerprints(clip.cond_stage_model) == base_fp
    errors = {}
    try:  # a text-encoder-only LoRA with no CLIP connected
        M["HyperSDLoraLoader"].execute(model=model, release="none (use lora_name)",
                                       lora_name=f"te_{tag}_peft.safetensors", strength_model=1.0,
                                       strength_clip=1.0, download_missing=False)
        errors[f"te_only_no_clip_{tag}"] = None
    except Exception as e:  # noqa: BLE001
        errors[f"te_only_no_clip_{tag}"] = f"{type(e).__name__}: {e}"
    results.setdefault("errors", {}).update(errors)
    results[f"te_{tag}_seconds"] = time.perf_counter() - t0


def release_checks(model, loras_dir):
    """A file already in the loras folder under a release's hub name is used as that release:
    its recommended outputs, and its LoRA scale (0.125 for SD3/FLUX) times strength."""
    import shutil

    M = nodes.NODE_CLASS_MAPPINGS
    src = os.path.join(loras_dir, "tiny_sd15_kohya.safetensors")
    out = {}
    for release in ("Hyper-SD15-1step-lora", "Hyper-SD15-8steps-CFG-lora", "Hyper-SD3-8steps-CFG-lora"):
        shutil.copy(src, os.path.join(loras_dir, release + ".safetensors"))
        r = M["HyperSDLoraLoader"].execute(model=model, release=release, lora_name="None", strength_model=0.5,
                                           strength_clip=1.0, download_missing=False).result
        out[release] = {"outputs": [r[i] for i in (2, 3, 4, 5, 6)], "info": r[7]}
    results["releases"] = out


def sdxl_checks(loras_dir):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import tiny_checkpoints as tc

    t0 = time.perf_counter()
    model = load_model(tc.random_weights(tc.SDXL_UNET.ldm_shapes(), 0, dtype=torch.float32))
    results["sdxl_model_family"] = type(model.model.model_config).__name__
    results["sdxl_model_load_seconds"] = time.perf_counter() - t0
    lora_checks(model, loras_dir, "sdxl", ("kohya", "peft", "peft_base_model", "diffusers_old"))
    te_checks(model, loras_dir, "sdxl")
    errors = {}
    try:  # an SD1.5 LoRA (made for the tiny SD1.5 model) on the SDXL-family model
        nodes.NODE_CLASS_MAPPINGS["HyperSDLoraLoader"].execute(
            model=model, release="none (use lora_name)", lora_name="tiny_sd15_kohya.safetensors",
            strength_model=1.0, strength_clip=1.0, download_missing=False)
        errors["sd15_lora_on_sdxl"] = None
    except Exception as e:  # noqa: BLE001
        errors["sd15_lora_on_sdxl"] = f"{type(e).__name__}: {e}"
    results.setdefault("errors", {}).update(errors)


def error_checks(model, loras_dir):
    from safetensors.torch import save_file

    M = nodes.NODE_CLASS_MAPPINGS
    errors = {}

    def capture(label, fn):
        try:
            fn()
            errors[label] = None
        except Exception as e:  # noqa: BLE001
            errors[label] = f"{type(e).__name__}: {e}"

    xl_key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    save_file({xl_key + ".lora_down.weight": torch.zeros(4, 2048), xl_key + ".lora_up.weight": torch.zeros(320, 4)},
              os.path.join(loras_dir, "sdxl_like.safetensors"))
    save_file({"lora_unet_nothing_here.lora_down.weight": torch.zeros(4, 8),
               "lora_unet_nothing_here.lora_up.weight": torch.zeros(8, 4)}, os.path.join(loras_dir, "nomatch.safetensors"))
    good = os.path.join(loras_dir, "tiny_sd15_kohya.safetensors")
    with open(good, "rb") as f:
        data = f.read()
    with open(os.path.join(loras_dir, "truncated.safetensors"), "wb") as f:
        f.write(data[: len(data) // 2])
    with open(os.path.join(loras_dir, "pickle.ckpt"), "wb") as f:
        f.write(b"\x80\x04K\x01.")

    def load(name):
        return M["HyperSDLoraLoader"].execute(model=model, release="none (use lora_name)", lora_name=name,
                                              strength_model=1.0, strength_clip=1.0, download_missing=False)

    for label, name in (("wrong_family", "sdxl_like.safetensors"), ("zero_match", "nomatch.safetensors"),
                        ("truncated", "truncated.safetensors"), ("pickle", "pickle.ckpt"),
                        ("missing", "missing.safetensors"), ("dotdot", "../loras/tiny_sd15_kohya.safetensors"),
                        ("absolute", good)):
        capture(label, lambda name=name: load(name))
    capture("release_offline", lambda: M["HyperSDLoraLoader"].execute(
        model=model, release="Hyper-SD15-4steps-lora", lora_name="None", strength_model=1.0, strength_clip=1.0,
        download_missing=False))
    capture("steps_0", lambda: M["HyperSDTCDScheduler"].execute(model=model, steps=0, denoise=1.0))
    capture("denoise_0", lambda: M["HyperSDTCDScheduler"].execute(model=model, steps=4, denoise=0.0))
    capture("eta_1.5", lambda: M["HyperSDTCDSampler"].execute(eta=1.5))
    capture("timestep_0", lambda: M["HyperSDOneStepScheduler"].execute(model=model, timestep=0))
    capture("timestep_1000", lambda: M["HyperSDOneStepScheduler"].execute(model=model, timestep=1000))

    nan_sd = tiny_sd15_state_dict()
    nan_sd["out.2.weight"] = torch.full_like(nan_sd["out.2.weight"], float("nan"))
    nan_model = load_model(nan_sd)
    positive = [[torch.zeros(1, 77, 768), {}]]
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    sampler = M["HyperSDTCDSampler"].execute(eta=0.3).result[0]
    sigmas = M["HyperSDTCDScheduler"].execute(model=nan_model, steps=2, denoise=1.0).result[0]
    capture("nan_tcd", lambda: M["SamplerCustom"]().sample(nan_model, True, 0, 1.0, positive, positive, sampler, sigmas, latent))
    sampler = M["HyperSDOneStepSampler"].execute(unit_variance_noise=True).result[0]
    sigmas = M["HyperSDOneStepScheduler"].execute(model=nan_model, timestep=800).result[0]
    capture("nan_one_step", lambda: M["SamplerCustom"]().sample(nan_model, True, 0, 1.0, positive, positive, sampler, sigmas, latent))
    results.setdefault("errors", {}).update(errors)


def main():
    with tempfile.TemporaryDirectory() as tmp:
        loras = setup_pack(tmp)
        t0 = time.perf_counter()
        model = load_model(tiny_sd15_state_dict())
        results["model_family"] = type(model.model.model_config).__name__
        results["model_load_seconds"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        sampling_checks(model)
        results["sampling_seconds"] = time.perf_counter() - t0
        lora_checks(model, loras, "sd15", ("kohya", "peft", "peft_base_model", "diffusers_old"))
        error_checks(model, loras)
        te_checks(model, loras, "sd15")
        del model
        sdxl_checks(loras)
    with open(OUT, "w") as f:
        json.dump(results, f, indent=1, default=str)


if __name__ == "__main__":
    main()
