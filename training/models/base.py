"""Base models: tiny built-ins, a local diffusers folder, a single-file checkpoint, or a hub id."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, Callable

import torch

from training.errors import ModelError


@dataclass
class Base:
    unet: Any
    vae: Any
    text_encoders: list
    tokenizers: list
    family: str               # sd15 | sdxl
    prediction_type: str      # epsilon | v_prediction
    abar: torch.Tensor        # float64 alphas_cumprod
    text_fn: Callable = None  # optional (prompts, device) -> {"prompt_embeds"}: conditioning without CLIP


def scheduler_abar(scheduler_config: dict | None = None) -> torch.Tensor:
    """float64 alphas_cumprod of a diffusers scheduler config (SD's scaled_linear by default)."""
    from schedulers import scaled_linear_alphas_cumprod

    cfg = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    cfg.update({k: v for k, v in (scheduler_config or {}).items() if k in cfg})
    if cfg["beta_schedule"] != "scaled_linear":
        from diffusers import DDPMScheduler

        return DDPMScheduler(**cfg).alphas_cumprod.to(torch.float64)
    return scaled_linear_alphas_cumprod(cfg["num_train_timesteps"], cfg["beta_start"], cfg["beta_end"])


def load_tiny_base(path: str | None = None) -> Base:
    """The shipped tiny teacher (training/models/tiny_teacher.safetensors, made by
    python -m training.models.tiny_pretrain), or the same layout from `path`: trained weights, VAE scaling set."""
    from training.models import tiny

    unet, vae, text_encoder, tokenizer = tiny.load_tiny_teacher(path or tiny.TEACHER_PATH)
    return Base(unet, vae, [text_encoder], [tokenizer], "sd15", "epsilon", scheduler_abar())


def build_tiny() -> Base:
    return load_tiny_base()


def _resolve(base: str, revision: str) -> str:
    """Local folder as is; otherwise treat it as a hub id and download (clear error offline)."""
    if os.path.isdir(base):
        return base
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", base) or base.startswith((".", "/")):
        raise ModelError(f"config key 'model.base': {base!r} does not exist")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(base, revision=revision or None,
                                 allow_patterns=["*.json", "*.txt", "unet/*.safetensors", "vae/*.safetensors",
                                                 "text_encoder*/*.safetensors", "tokenizer*/*"])
    except Exception as e:  # offline, unknown repo, auth: all end here
        raise ModelError(f"config key 'model.base': {base!r} is not a local folder and could not be "
                         f"downloaded from the Hugging Face hub ({type(e).__name__}: {e}). Pass a local "
                         "diffusers folder or a .safetensors checkpoint.") from e


def _detect_family(path: str, family: str) -> str:
    if family != "auto":
        return family
    return "sdxl" if os.path.isdir(os.path.join(path, "text_encoder_2")) else "sd15"


def load_diffusers_folder(path: str, family: str, prediction_type: str, dtype=torch.float32) -> Base:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    for sub in ("unet", "vae", "text_encoder", "tokenizer"):
        if not os.path.isdir(os.path.join(path, sub)):
            raise ModelError(f"config key 'model.base': {path} is not a diffusers pipeline folder (no {sub}/)")
    family = _detect_family(path, family)
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dtype)
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=torch.float32)
    encoders = [CLIPTextModel.from_pretrained(path, subfolder="text_encoder", torch_dtype=dtype)]
    tokenizers = [CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")]
    if family == "sdxl":
        encoders.append(CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", torch_dtype=dtype))
        tokenizers.append(CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2"))
    sched = DDPMScheduler.from_pretrained(path, subfolder="scheduler").config
    pt = sched.get("prediction_type", "epsilon") if prediction_type == "auto" else prediction_type
    return Base(unet, vae, encoders, tokenizers, family, pt, scheduler_abar(sched))


def load_single_file(path: str, family: str, prediction_type: str, config_dir: str) -> Base:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    kwargs = {"config": config_dir, "local_files_only": True} if config_dir else {}
    try:
        pipe = cls.from_single_file(path, **kwargs)
    except Exception as e:
        raise ModelError(
            f"config key 'model.base': could not load single-file checkpoint {path} "
            f"({type(e).__name__}: {e}). Offline, set 'model.single_file_config' to a local diffusers "
            "folder with the matching model_index.json / */config.json, and 'model.family' (sd15|sdxl).") from e
    fam = "sdxl" if isinstance(pipe, StableDiffusionXLPipeline) else "sd15"
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if fam == "sdxl" else [])
    tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if fam == "sdxl" else [])
    pt = pipe.scheduler.config.get("prediction_type", "epsilon") if prediction_type == "auto" else prediction_type
    return Base(pipe.unet, pipe.vae, encoders, tokenizers, fam, pt, scheduler_abar(dict(pipe.scheduler.config)))


def load_base(model_cfg) -> Base:
    base = model_cfg.base
    if base == "tiny":
        b = build_tiny()
        if model_cfg.prediction_type != "auto":
            b.prediction_type = model_cfg.prediction_type
        return b
    if os.path.isfile(base):
        if not base.endswith(".safetensors"):
            raise ModelError(f"config key 'model.base': {base} must be a .safetensors checkpoint "
                             "(pickle checkpoints are not loaded)")
        return load_single_file(base, model_cfg.family, model_cfg.prediction_type, model_cfg.single_file_config)
    path = _resolve(base, model_cfg.revision)
    return load_diffusers_folder(path, model_cfg.family, model_cfg.prediction_type)
