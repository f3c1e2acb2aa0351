"""UNet LoRAs on a real ComfyUI model: files in every key format made from the model's own diffusers
names, applied by the pack's loader and read back weight by weight as ComfyUI runs them."""
import os

import torch


def diffusers_to_comfy(model):
    """diffusers module path -> ComfyUI weight key, from ComfyUI's own mapping."""
    import comfy.utils

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
    import comfy.model_management

    comfy.model_management.load_models_gpu([model_patcher], force_full_load=True)
    try:
        sd = model_patcher.model.state_dict()
        return {k: sd[k].detach().clone() for k in keys}
    finally:
        comfy.model_management.unload_all_models()


def same_patches(ours: dict, core: dict) -> bool:
    """ModelPatcher.patches equal entry by entry: the same weight keys, strengths, offsets, functions, and
    adapters of the same class holding equal tensors (what ComfyUI computes every patched weight from)."""
    def same(a, b):
        if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
            return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
        if isinstance(a, (tuple, list)) or isinstance(b, (tuple, list)):
            return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
        if hasattr(a, "weights") or hasattr(b, "weights"):  # comfy.weight_adapter adapters
            return type(a) is type(b) and same(a.weights, b.weights)
        return a == b
    return ours.keys() == core.keys() and all(same(ours[k], core[k]) for k in core)


def count_key_map_builds(fn):
    """(fn(), calls of comfy.lora.model_lora_keys_unet / _clip during it)."""
    import comfy.lora

    calls = {"unet": 0, "clip": 0}
    originals = comfy.lora.model_lora_keys_unet, comfy.lora.model_lora_keys_clip

    def counted(kind, original):
        def wrapper(*a, **kw):
            calls[kind] += 1
            return original(*a, **kw)
        return wrapper
    comfy.lora.model_lora_keys_unet = counted("unet", originals[0])
    comfy.lora.model_lora_keys_clip = counted("clip", originals[1])
    try:
        return fn(), calls
    finally:
        comfy.lora.model_lora_keys_unet, comfy.lora.model_lora_keys_clip = originals


ALL_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2", "conv1")
ATTN_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def lora_checks(run, model, tag, formats):
    import comfy.sd
    from safetensors.torch import save_file

    M = run.nodes()
    base = {k: v.detach().clone() for k, v in model.model.state_dict().items()}
    rank, alpha, strength = 4, 2.0, 0.7
    for fmt in formats:
        weights = lora_weights_for(model, ATTN_TARGETS if fmt == "diffusers_old" else ALL_TARGETS, rank)
        deltas = expected_deltas(model, weights, alpha / rank if fmt == "kohya" else 1.0)
        name = f"tiny_{tag}_{fmt}.safetensors"
        save_file(lora_file(weights, fmt, alpha), os.path.join(run.loras, name))
        run.clear_log()
        out, key_maps = count_key_map_builds(lambda: M["HyperSDLoraLoader"].execute(
            model=model, release="none (use lora_name)", lora_name=name, strength_model=strength,
            strength_clip=1.0, download_missing=False))
        new_model, info = out.result[0], out.result[7]
        not_loaded = run.count_log("lora key not loaded")
        if fmt == "kohya":  # a format core maps itself: its patches must be the node's
            core_model, _ = comfy.sd.load_lora_for_models(model, None, lora_file(weights, fmt, alpha), strength, 1.0)
            run.results[f"lora_{tag}_kohya_patches_equal_core"] = same_patches(new_model.patches, core_model.patches)
            run.results[f"lora_{tag}_kohya_key_map_builds"] = key_maps
        got = patched_weights(new_model, list(deltas))
        err = max(float((got[k] - (base[k] + strength * deltas[k])).abs().max()) for k in deltas)
        changed = sum(not torch.equal(got[k], base[k]) for k in deltas)
        run.results[f"lora_{tag}_{fmt}"] = {"info": info, "lora_key_not_loaded": not_loaded, "max_abs_err": err,
                                            "changed_weights": changed, "expected_changed": len(deltas),
                                            "outputs": [out.result[i] for i in (2, 3, 4, 5, 6)]}
        if fmt == "peft":  # ComfyUI's own loader on the raw PEFT file, for contrast
            run.clear_log()
            comfy.sd.load_lora_for_models(model, None, lora_file(weights, fmt, alpha), 1.0, 1.0)
            run.results[f"core_loader_{tag}_peft_not_loaded"] = run.count_log("lora key not loaded")
    if tag == "sd15":
        release_checks(run, model)
    now = model.model.state_dict()
    run.results[f"base_model_unchanged_{tag}"] = all(torch.equal(now[k], base[k]) for k in base)


def release_checks(run, model):
    """A file already in the loras folder under a release's hub name is used as that release:
    its recommended outputs, and its LoRA scale (0.125 for SD3/FLUX) times strength."""
    import shutil

    M = run.nodes()
    src = os.path.join(run.loras, "tiny_sd15_kohya.safetensors")
    out = {}
    for release in ("Hyper-SD15-1step-lora", "Hyper-SD15-8steps-CFG-lora", "Hyper-SD3-8steps-CFG-lora"):
        shutil.copy(src, os.path.join(run.loras, release + ".safetensors"))
        r = M["HyperSDLoraLoader"].execute(model=model, release=release, lora_name="None", strength_model=0.5,
                                           strength_clip=1.0, download_missing=False).result
        out[release] = {"outputs": [r[i] for i in (2, 3, 4, 5, 6)], "info": r[7]}
    run.results["releases"] = out
