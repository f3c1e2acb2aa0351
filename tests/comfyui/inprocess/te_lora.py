"""Text-encoder LoRAs in every claimed key format on real ComfyUI CLIPs (SD1.5: CLIP-L; SDXL: CLIP-L +
CLIP-G, full size, random weights, built by ComfyUI's own text-encoder loader), patched weights read
back as ComfyUI runs them, with ComfyUI's own loader on the same files for contrast."""
import os
import time

import torch

from .unet_lora import ATTN_TARGETS, lora_file, lora_weights_for, same_patches

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


def load_clip(run, tag, seed=0):
    """A float32 CLIP the way CLIPLoader / DualCLIPLoader build one: random-weight HF CLIP-L (and
    open_clip CLIP-G for SDXL) state dicts through comfy.sd.load_text_encoder_state_dicts."""
    import comfy.sd
    import tiny_checkpoints as tc  # tests/comfyui, the entry script's folder, is on sys.path

    sds = [tc.random_weights(tc.clip_l_shapes("text_model."), seed, dtype=torch.float32)]
    if tag == "sdxl":
        sds.append(tc.random_weights(tc.open_clip_g_shapes(""), seed + 1, dtype=torch.float32))
    run.clear_log()
    clip = comfy.sd.load_text_encoder_state_dicts(sds, clip_type=comfy.sd.CLIPType.STABLE_DIFFUSION,
                                                  model_options={"dtype": torch.float32})
    run.results[f"te_{tag}_clip_missing_logged"] = [m for m in run.log.messages if m.startswith("clip missing")]
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


def te_format_check(run, model, clip, base_fp, tag, fmt, generator):
    """One text-encoder LoRA file in format ``fmt`` through HyperSDLoraLoader; the result dict.
    ``base_fp``: the unpatched CLIP's weight fingerprints."""
    import comfy.model_management
    import comfy.sd
    from safetensors.torch import save_file

    prefixes, with_alpha, mlp = TE_FORMATS[tag][fmt]
    clip_sd = clip.cond_stage_model.state_dict()  # the live tensors
    rank, alpha, strength = 4, 2.0, 0.6
    weights = {}
    for enc, path in te_targets(tag, mlp):
        out_f, in_f = clip_sd[te_weight_key(enc, path)].shape
        weights[(enc, path)] = (torch.randn(rank, in_f, generator=generator) * 0.1,
                                torch.randn(out_f, rank, generator=generator) * 0.1)
    scale = alpha / rank if with_alpha else 1.0
    expected = {te_weight_key(enc, path): clip_sd[te_weight_key(enc, path)].double()
                + strength * scale * (up.double() @ down.double())
                for (enc, path), (down, up) in weights.items()}
    lora = te_lora_file(weights, prefixes, fmt, alpha if with_alpha else None)
    name = f"te_{tag}_{fmt}.safetensors"
    save_file(lora, os.path.join(run.loras, name))
    run.clear_log()
    out = run.nodes()["HyperSDLoraLoader"].execute(model=model, release="none (use lora_name)", lora_name=name,
                                                   strength_model=1.0, strength_clip=strength,
                                                   download_missing=False, clip=clip)
    new_model, new_clip, info = out.result[0], out.result[1], out.result[7]
    not_loaded = run.count_log("lora key not loaded", "NOT LOADED")
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
    run.clear_log()
    core_model, core_clip = comfy.sd.load_lora_for_models(model, clip, dict(lora), 1.0, strength)
    r["core_not_loaded"] = run.count_log("lora key not loaded")
    r["core_clip_patches"] = len(core_clip.patcher.patches)
    r["patches_equal_core"] = (same_patches(new_clip.patcher.patches, core_clip.patcher.patches)
                               and same_patches(new_model.patches, core_model.patches))
    return r


def te_mixed_check(run, model, clip):
    """One file with UNet (kohya) and text-encoder (PEFT) LoRAs, with and without CLIP."""
    from safetensors.torch import save_file

    alpha, strength = 2.0, 0.6
    unet = lora_file(lora_weights_for(model, ATTN_TARGETS), "kohya", alpha)
    te = load_safetensors(os.path.join(run.loras, "te_sd15_peft.safetensors"))
    save_file({**unet, **te}, os.path.join(run.loras, "mixed_sd15.safetensors"))
    mixed = {"unet_tensors": len(unet), "te_tensors": len(te)}
    for label, c in (("with_clip", clip), ("no_clip", None)):
        run.clear_log()
        out = run.nodes()["HyperSDLoraLoader"].execute(model=model, release="none (use lora_name)",
                                                       lora_name="mixed_sd15.safetensors", strength_model=1.0,
                                                       strength_clip=strength, download_missing=False, clip=c)
        mixed[label] = {"info": out.result[7], "model_patches": len(out.result[0].patches),
                        "clip_patches": None if out.result[1] is None else len(out.result[1].patcher.patches),
                        "lora_key_not_loaded": run.count_log("lora key not loaded")}
    return mixed


def te_checks(run, model, tag):
    """Text-encoder LoRAs in every claimed format, applied by the node to a real ComfyUI CLIP."""
    t0 = time.perf_counter()
    clip = load_clip(run, tag)
    run.results[f"te_{tag}_clip_class"] = type(clip.cond_stage_model).__name__
    run.results[f"te_{tag}_clip_load_seconds"] = time.perf_counter() - t0
    run.results[f"te_{tag}_clip_dtypes"] = sorted({str(v.dtype) for v in clip.cond_stage_model.state_dict().values()})
    base_fp = fingerprints(clip.cond_stage_model)
    g = torch.Generator().manual_seed(1)
    for fmt in TE_FORMATS[tag]:
        run.results[f"te_{tag}_{fmt}"] = te_format_check(run, model, clip, base_fp, tag, fmt, g)
    if tag == "sd15":
        run.results["te_sd15_mixed"] = te_mixed_check(run, model, clip)
    run.results[f"te_{tag}_base_clip_unchanged"] = fingerprints(clip.cond_stage_model) == base_fp
    errors = {}
    run.capture(errors, f"te_only_no_clip_{tag}", lambda: run.nodes()["HyperSDLoraLoader"].execute(  # no CLIP
        model=model, release="none (use lora_name)", lora_name=f"te_{tag}_peft.safetensors", strength_model=1.0,
        strength_clip=1.0, download_missing=False))
    run.add_errors(errors)
    run.results[f"te_{tag}_seconds"] = time.perf_counter() - t0
