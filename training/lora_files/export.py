"""What a run writes: each stage group's LoRA, the ONE unified LoRA (exact rank concatenation or an SVD
re-rank, with the merge error measured), their metadata, and the full 1-step UNet folder."""
from __future__ import annotations

import json
import os

import torch

from training.diffusion import recommended_eta
from training.files import atomic_folder, save_file_atomic
from training.lora_files.kohya import LoraModule, modules_to_state_dict, save_kohya
from training.lora_files.merge import merge_exact, svd_rerank
from training.lora_files.peft_bridge import peft_to_kohya


def adapter_state_dict(unet, adapter="default", dtype=torch.float32) -> dict:
    """peft LoRA adapter -> {lora_unet_<path with _>.lora_down.weight / .lora_up.weight / .alpha}."""
    try:
        modules = peft_to_kohya(unet, adapter)
    except ValueError:
        raise ValueError(f"no LoRA layers named {adapter!r} found on the UNet (was add_lora called?)") from None
    return modules_to_state_dict(modules, dtype)


def export_lora(unet, path, metadata=None, adapter="default") -> int:
    """One peft adapter -> a kohya file; returns the number of tensors written."""
    state = adapter_state_dict(unet, adapter)
    save_file_atomic(state, path, metadata)
    return len(state)


def lora_metadata(cfg, family, prediction_type) -> dict:
    tscd = [s for s in cfg.stages if s.type in ("tscd", "adversarial")] or cfg.stages
    steps = max(1, tscd[-1].segments)
    return {
        "ss_network_module": "networks.lora", "ss_network_dim": str(cfg.lora.rank),
        "ss_network_alpha": str(cfg.lora.alpha),
        "hypersd.base_family": family, "hypersd.prediction_type": prediction_type,
        "hypersd.stages": json.dumps([{"type": s.type, "segments": s.segments, "steps": s.steps} for s in cfg.stages]),
        "hypersd.recommended_sampler": "tcd", "hypersd.recommended_steps": str(steps),
        "hypersd.recommended_eta": str(recommended_eta(steps)), "hypersd.recommended_cfg": "1.0",
        "hypersd.base": cfg.model.base,
    }


def export_stages_and_merge(unet, out_dir, lora_path, meta, groups, merge_rank=0, lora_rank=0, init=False):
    """stages/<i>_<group>.safetensors per (group, adapter) in `groups`, then ONE unified kohya LoRA of
    every adapter (and the frozen "init" one), with the error against the exact sum of deltas."""
    report = {"stage_files": []}
    for i, (group, adapter) in enumerate(groups):
        path = os.path.join(out_dir, "stages", f"{i + 1}_{group}.safetensors")
        export_lora(unet, path, {**meta, "hypersd.stage_group": group}, adapter=adapter)
        report["stage_files"].append(path)
    names = (["init"] if init else []) + [adapter for _, adapter in groups]
    if len(names) == 1 and not merge_rank:
        # one adapter: write it as is (true alpha, its own rank); nothing to merge
        report.update(keys=export_lora(unet, lora_path, meta, adapter=names[0]), rank=lora_rank,
                      merged_from=names, rel_error=0.0)
        return report
    parts = [peft_to_kohya(unet, n) for n in names]
    merged = merge_exact(parts)
    if merge_rank:
        merged, _, overall = svd_rerank(merged, merge_rank)
        report["svd_rel_error"] = overall
    rank = max(m.rank for m in merged.values())
    save_kohya(lora_path, merged, {**meta, "ss_network_dim": str(rank), "ss_network_alpha": str(rank),
                                   "hypersd.merged_from": json.dumps(names)})
    report.update(keys=3 * len(merged), rank=rank, merged_from=names, **merge_error(merged, parts))
    return report


def merge_error(merged: dict, parts: list) -> dict:
    """What the written (fp32) file holds vs the exact sum of stage deltas: relative Frobenius and max abs."""
    want_sq = err_sq = worst = 0.0
    for name, m in merged.items():
        want = sum(p[name].delta() for p in parts if name in p)
        got = LoraModule(m.down.float(), m.up.float(), m.alpha).delta()
        err = (got - want).norm().item()
        want_sq, err_sq = want_sq + want.norm().item() ** 2, err_sq + err ** 2
        worst = max(worst, (got - want).abs().max().item())
    return {"rel_error": (err_sq / max(want_sq, 1e-30)) ** 0.5, "max_abs_error": worst}


# --- the full 1-step UNet (score_distill mode full) ---------------------------------------------------

def full_unet_metadata(family, prediction_type, timestep, base=""):
    return {"format": "pt", "hypersd.kind": "1step_unet", "hypersd.base_family": family,
            "hypersd.prediction_type": prediction_type, "hypersd.timestep": str(timestep),
            "hypersd.recommended_scheduler": "HyperSDOneStepScheduler",
            "hypersd.recommended_sampler": "HyperSDOneStepSampler", "hypersd.recommended_steps": "1",
            "hypersd.recommended_cfg": "1.0", "hypersd.base": base}


def export_full_unet(unet, folder: str, metadata: dict, dtype=None):
    """<folder>/config.json + <folder>/diffusion_pytorch_model.safetensors (diffusers layout: loads with
    UNet2DConditionModel.from_pretrained(folder); the .safetensors alone loads in ComfyUI's UNETLoader for
    real SD1.5 / SDXL shapes). Written into a temp folder that is renamed into place (atomic)."""
    from safetensors.torch import save_file

    with atomic_folder(folder) as tmp:
        sd = {k: v.detach().to(dtype or v.dtype).cpu().contiguous() for k, v in unet.state_dict().items()}
        save_file(sd, os.path.join(tmp, "diffusion_pytorch_model.safetensors"),
                  metadata={k: str(v) for k, v in metadata.items()})
        unet.save_config(tmp)
    return os.path.join(os.path.abspath(folder), "diffusion_pytorch_model.safetensors")


# --- the teacher as a diffusers pipeline (the tiny default) -------------------------------------------

def export_teacher_pipeline(base, plain_unet, folder: str) -> str:
    """`<folder>/` in StableDiffusionPipeline.save_pretrained layout (UNet without adapters, VAE, text encoder,
    tokenizer, a DDPM scheduler config with the run's schedule), so plain diffusers can load the teacher and
    the run's LoRA: from_pretrained(folder), load_lora_weights(lora), TCDScheduler.from_config. Written into
    a temp folder renamed into place."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    if base.family != "sd15":
        raise ValueError("the teacher pipeline export is for SD1.5-layout models (the tiny default)")
    scheduler = DDPMScheduler(num_train_timesteps=len(base.abar), beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", prediction_type=base.prediction_type,
                              timestep_spacing="trailing", clip_sample=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=base.vae, text_encoder=base.text_encoders[0], tokenizer=base.tokenizers[0],
                                   unet=plain_unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()  # "Writing model shards" of the text encoder
    with atomic_folder(folder) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
    return os.path.abspath(folder)
