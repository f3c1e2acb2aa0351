"""Real-architecture SD1.5 / SDXL networks for the full-size benchmark, from their published configs
(diffusers' unet/vae config.json, transformers' CLIP configs), with random weights: nothing is
downloaded. `count_params` builds a network on the meta device (no memory) to count its parameters."""
from __future__ import annotations

import contextlib

import torch

# stable-diffusion-v1-5/stable-diffusion-v1-5 unet/config.json (the keys that differ from diffusers' defaults)
SD15_UNET = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": [320, 640, 1280, 1280], "attention_head_dim": 8, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "norm_num_groups": 32, "flip_sin_to_cos": True, "freq_shift": 0, "downsample_padding": 1,
}

# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json
SDXL_UNET = {
    "sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": [320, 640, 1280], "attention_head_dim": [5, 10, 20], "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "transformer_layers_per_block": [1, 2, 10], "use_linear_projection": True,
    "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816, "norm_num_groups": 32, "flip_sin_to_cos": True, "freq_shift": 0,
}

# The SD VAE (the same architecture in SD1.5 and SDXL; only the scaling factor differs)
VAE = {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
       "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
       "up_block_types": ["UpDecoderBlock2D"] * 4}
VAE_SCALING = {"sd15": 0.18215, "sdxl": 0.13025}

# openai/clip-vit-large-patch14 text model (SD1.5; SDXL's text_encoder) and laion CLIP ViT-bigG/14
# (SDXL's text_encoder_2, with projection)
CLIP_L_TEXT = {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
               "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
               "projection_dim": 768}
CLIP_G_TEXT = {"vocab_size": 49408, "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
               "num_attention_heads": 20, "max_position_embeddings": 77, "hidden_act": "gelu",
               "projection_dim": 1280}
# openai/clip-vit-large-patch14 vision model: the laion_aesthetic reward's image encoder
CLIP_L_VISION = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
                 "image_size": 224, "patch_size": 14, "projection_dim": 768, "hidden_act": "quick_gelu"}

UNETS = {"sd15": SD15_UNET, "sdxl": SDXL_UNET}
TEXT_DIMS = {"sd15": 768, "sdxl": 2048}  # encoder_hidden_states width
POOLED_DIM = 1280  # SDXL text_embeds (text_encoder_2's projection)
# diffusers train_lcm_distill_lora_sd(xl).py: the LoRA target modules of the reference LCM-LoRA recipe
LCM_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
               "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj"]


@contextlib.contextmanager
def default_dtype(dtype):
    """Build directly in `dtype` (an SDXL UNet built in fp32 and cast would briefly hold both copies)."""
    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(saved)


def build_unet(family: str, dtype=torch.float32, device="cpu"):
    from diffusers import UNet2DConditionModel

    with default_dtype(dtype), torch.device(device):
        return UNet2DConditionModel(**UNETS[family]).eval()


def build_vae(family: str, dtype=torch.float32, device="cpu"):
    from diffusers import AutoencoderKL

    with default_dtype(dtype), torch.device(device):
        return AutoencoderKL(**VAE, scaling_factor=VAE_SCALING[family]).eval()


def build_text_encoders(family: str, device="cpu"):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device(device):
        encoders = [CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT))]
        if family == "sdxl":
            encoders.append(CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G_TEXT)))
    return encoders


def build_aesthetic_reward(dtype=torch.float32, device="cpu"):
    """The product's laion_aesthetic reward (training.models.rewards.LaionAesthetic) with random weights."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from training.models.rewards import AestheticMLP, LaionAesthetic

    with default_dtype(dtype), torch.device(device):
        vision = CLIPVisionModelWithProjection(CLIPVisionConfig(**CLIP_L_VISION))
        return LaionAesthetic(vision, AestheticMLP(CLIP_L_VISION["projection_dim"]))


def count_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def meta_counts(family: str) -> dict:
    """Parameter counts of every network of `family` (built on the meta device: no memory, no time)."""
    return {"unet": count_params(build_unet(family, device="meta")),
            "vae": count_params(build_vae(family, device="meta")),
            "text_encoders": [count_params(m) for m in build_text_encoders(family, device="meta")],
            "reward_clip_l_vision": count_params(build_aesthetic_reward(device="meta"))}


def unet_conditioning(family: str, batch: int, gen=None, dtype=torch.float32, device="cpu") -> tuple[dict, dict]:
    """(cond, uncond) UNet kwargs shaped as the text encoders' outputs (77 tokens; SDXL: pooled embeds
    and 1024 px time_ids), random for cond and zeros for the empty prompt."""
    def kwargs(fill):
        out = {"encoder_hidden_states": fill((batch, 77, TEXT_DIMS[family]))}
        if family == "sdxl":
            ids = torch.tensor([[1024, 1024, 0, 0, 1024, 1024]], dtype=dtype, device=device).expand(batch, 6)
            out["added_cond_kwargs"] = {"text_embeds": fill((batch, POOLED_DIM)), "time_ids": ids.contiguous()}
        return out

    cond = kwargs(lambda s: torch.randn(s, generator=gen).to(device, dtype))
    return cond, kwargs(lambda s: torch.zeros(s, dtype=dtype, device=device))
