"""A LoRA exported by training/export.py loads in real ComfyUI with no "lora key not loaded".

The tiny diffusers UNet of the default run is not a ComfyUI-loadable model, so this builds a
diffusers UNet with the shapes of the comfy-env helper's tiny SD1.5 checkpoint (320 channels, one
level, context 768), puts the trainer's default LoRA targets on it (attention, ff, proj, resnet
convs, time_emb_proj), exports it and runs it twice: core LoraLoaderModelOnly + KSampler, and the
pack's HyperSDLoraLoader + HyperSDTCDSampler/HyperSDTCDScheduler in SamplerCustom (4 steps).
"""
from __future__ import annotations

import torch

from .harness import core_txt2img_prompt
from .tiny_checkpoints import SD15_UNET


def _sd15_shaped_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(320,),
        down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
        cross_attention_dim=768, attention_head_dim=8, use_linear_projection=False)


def _pack_tcd_prompt(ckpt_name: str, lora_name: str, steps: int = 4) -> dict:
    """The pack's path: HyperSDLoraLoader (local file) -> SamplerCustom with the pack's TCD nodes."""
    prompt = core_txt2img_prompt(ckpt_name, seed=5)
    del prompt["sampler"]
    prompt["lora"] = {"class_type": "HyperSDLoraLoader", "inputs": {
        "model": ["ckpt", 0], "clip": ["ckpt", 1], "release": "none (use lora_name)", "lora_name": lora_name,
        "strength_model": 1.0, "strength_clip": 1.0, "download_missing": False}}
    prompt["tcd"] = {"class_type": "HyperSDTCDSampler", "inputs": {"eta": 0.3}}
    prompt["sigmas"] = {"class_type": "HyperSDTCDScheduler", "inputs": {"model": ["lora", 0], "steps": steps,
                                                                         "denoise": 1.0}}
    prompt["sampler"] = {"class_type": "SamplerCustom", "inputs": {
        "model": ["lora", 0], "add_noise": True, "noise_seed": 5, "cfg": 1.0, "positive": ["pos", 0],
        "negative": ["neg", 0], "sampler": ["tcd", 0], "sigmas": ["sigmas", 0], "latent_image": ["latent", 0]}}
    prompt["decode"]["inputs"]["samples"] = ["sampler", 0]
    return prompt


def _run_in_comfyui(comfy_server, tiny_models, lora_path, n_modules: int) -> None:
    """Core loader + KSampler, then the pack's loader + TCD: both run, no key left unloaded."""
    ckpt_name = comfy_server.add_model("checkpoints", tiny_models.sd15_checkpoint)
    lora_name = comfy_server.add_model("loras", lora_path)
    core = core_txt2img_prompt(ckpt_name, seed=5)
    core["lora"] = {"class_type": "LoraLoaderModelOnly",
                    "inputs": {"model": ["ckpt", 0], "lora_name": lora_name, "strength_model": 1.0}}
    core["sampler"]["inputs"]["model"] = ["lora", 0]
    for label, prompt in (("core LoraLoaderModelOnly + KSampler", core),
                          ("HyperSDLoraLoader + TCD", _pack_tcd_prompt(ckpt_name, lora_name))):
        log_before = len(comfy_server.log())
        result = comfy_server.run_prompt(prompt)
        assert result.ok, f"{label}: {result.error_text()}"
        run_log = comfy_server.log()[log_before:]
        assert "lora key not loaded" not in run_log, f"{label}: {run_log[-3000:]}"
        assert result.outputs, f"{label}: no image written"
        if "HyperSD" in label:
            assert f"applied {n_modules}/{n_modules} modules to SD15" in run_log, run_log[-3000:]


def test_trained_lora_loads_every_key_in_comfyui(comfy_server, tiny_models, tmp_path):
    from training.config import LoRAConfig
    from training.lora_files.export import adapter_state_dict, export_lora
    from training.models.adapters import add_adapter

    unet = _sd15_shaped_unet()
    shapes = SD15_UNET.diffusers_modules()
    mods = dict(unet.named_modules())
    for path, shape in shapes.items():  # same module tree as the ComfyUI checkpoint
        assert tuple(mods[path].weight.shape) == shape, path
    params = add_adapter(unet, "default", 4, 2.0, LoRAConfig().targets, trainable=True)
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.01)
    lora_path = tmp_path / "trained-sd15.safetensors"
    export_lora(unet, str(lora_path), {"hypersd.base_family": "sd15"})
    n_modules = sum(k.endswith(".alpha") for k in adapter_state_dict(unet))
    assert n_modules >= 20

    _run_in_comfyui(comfy_server, tiny_models, lora_path, n_modules)
    print(f"{n_modules} LoRA modules loaded by ComfyUI (core loader and the pack's loader + TCD) with no unmatched key")


def test_unified_stage_lora_loads_every_key_in_comfyui(comfy_server, tiny_models, tmp_path):
    """The unified LoRA training.run writes (TSCD + feedback + score-distill adapters merged exactly)."""
    from safetensors.torch import load_file

    from training.config import load_config
    from training.lora_files.export import export_stages_and_merge
    from training.models.adapters import add_adapter

    cfg = load_config(None, ["lora.rank=4", "lora.alpha=2"])
    unet = _sd15_shaped_unet()
    params = add_adapter(unet, "default", 4, 2.0, cfg.lora.targets, trainable=True)
    params += add_adapter(unet, "feedback", 4, 2.0, cfg.lora.targets)
    params += add_adapter(unet, "dmd", 4, 2.0, cfg.lora.targets)
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.01)
    lora_path = tmp_path / "unified-sd15.safetensors"
    groups = [("tscd", "default"), ("feedback", "feedback"), ("score_distill", "dmd")]
    report = export_stages_and_merge(unet, str(tmp_path), str(lora_path), {"hypersd.base_family": "sd15"}, groups,
                                     cfg.output.merge_rank, cfg.lora.rank)
    assert report["rank"] == 12 and report["rel_error"] < 1e-6
    n_modules = sum(k.endswith(".alpha") for k in load_file(str(lora_path)))
    assert n_modules >= 20

    _run_in_comfyui(comfy_server, tiny_models, lora_path, n_modules)
    print(f"unified LoRA (rank {report['rank']}, {n_modules} modules) loaded by ComfyUI (core loader and the pack's loader + TCD) with no unmatched key")
