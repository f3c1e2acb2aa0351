"""Every bad input's error message: files (wrong family, zero match, truncated, pickle, missing, path
tricks), an offline release, out-of-range scheduler/sampler values, NaN from the model."""
import os

import torch

from .comfy_env import load_model, tiny_sd15_state_dict


def error_checks(run, model):
    from safetensors.torch import save_file

    M = run.nodes()
    loras_dir = run.loras
    errors = {}

    def capture(label, fn):
        run.capture(errors, label, fn)

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
    run.add_errors(errors)
